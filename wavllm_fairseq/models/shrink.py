"""CTC shrinking of the speech span (``model.speech_shrink=ctc``; optional, not the paper's).

After stage 1a (criterion ``wavllm_ctc_align``) every 80 ms speech embedding scores the LLM's vocabulary by its
dot product with the frozen token embeddings, plus a learned blank. Most frames then score the blank highest
and a token's frames repeat that token. The LLM reads such a span far worse than the tokens themselves
(examples/wavllm/toy/RESULTS.md, "Where the open vocabulary is lost": the transcript's token embeddings read
back at WER 22, the same tokens each stretched over three positions at 47). With this option the span keeps
only the frames whose best score is a token, and a run of frames with the same best token becomes one
position (their mean), so the LLM reads about one position per token heard. This is the shrinking step of
Soundwave (arXiv 2502.12900) without its cross-attention; the kept frames are the projector's outputs, so
they carry both encoders' streams as before.

The blank (a vector and a bias) is this module's: stage 1a trains it (the criterion scores with it when the
model has one), and the LLM's loss gives it no gradient (the choice of frames is not differentiable; the
kept frames are): in stage 1 only ``criterion.ctc_weight`` (the same CTC beside the answer loss) trains it.
A clip whose every frame scores blank, e.g. silence, keeps its one frame least blank, so every clip reaches
the LLM.

With ``model.speech_shrink=ctc_tokens`` each kept frame is replaced by its expected token embedding, the
softmax of its token scores (the blank left out) times the embedding table, before a run is averaged: the LLM
reads points of its own input space, at their scale (LegoSLM, arXiv 2505.11352, feeds an LLM so), and the
gradient reaches the adapters through the scores. What the frames carry beyond the words (speaker, style) is
then not in the span.
"""
from typing import Tuple

import torch
import torch.nn as nn


class CTCShrink(nn.Module):
    """Keeps the frames that CTC's scores assign to a token, one position per run of the same token.

    Args:
        dim (int): the LLM's width (the speech embeddings' and the token embeddings').
        tokens (bool): each kept frame becomes its expected token embedding (``ctc_tokens``; module docstring).
    """

    def __init__(self, dim: int, tokens: bool = False):
        super().__init__()
        self.tokens = bool(tokens)
        self.blank = nn.Parameter(torch.zeros(int(dim)))
        self.blank_bias = nn.Parameter(torch.zeros(()))

    def logits(self, frames: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """CTC's scores of each frame: blank at index 0, token ``v`` at ``v + 1``.

        Args:
            frames (torch.Tensor): speech embeddings (or the criterion's rescaled ones), shape (B, N, D).
            table (torch.Tensor): the LLM's input embeddings, shape (V, D).

        Returns:
            torch.Tensor: shape (B, N, V + 1), in the dtype of ``frames``.
        """
        blank = frames @ self.blank.to(frames.dtype) + self.blank_bias.to(frames.dtype)
        return torch.cat([blank[..., None], frames @ table.to(frames.dtype).t()], dim=-1)

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor,
                table: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The shrunk span.

        Args:
            frames (torch.Tensor): speech embeddings, shape (B, N, D), right-padded.
            lengths (torch.Tensor): valid frames per row, shape (B,).
            table (torch.Tensor): the LLM's input embeddings, shape (V, D).

        Returns:
            Tuple[torch.Tensor, torch.Tensor]: the kept positions, shape (B, M, D) (right-padded with
            zeros), and their number per row (B,): 0 only where ``lengths`` is 0.
        """
        B, N, D = frames.shape
        valid = torch.arange(N, device=frames.device)[None, :] < lengths[:, None]  # (B, N)
        with torch.no_grad():
            scores = self.logits(frames.float(), table.float())
            best = scores.argmax(-1)  # (B, N)
            keep = (best != 0) & valid
            # a row with no token frame keeps its frame least blank (largest token score over the blank's)
            margin = (scores[..., 1:].max(-1).values - scores[..., 0]).masked_fill(~valid, float("-inf"))
            empty = ~keep.any(1) & (lengths > 0)
            if bool(empty.any()):
                keep[empty, margin[empty].argmax(-1)] = True
            prev_best = torch.cat([best.new_full((B, 1), -1), best[:, :-1]], dim=1)
            prev_keep = torch.cat([keep.new_zeros(B, 1), keep[:, :-1]], dim=1)
            start = keep & ~(prev_keep & (prev_best == best))  # a new position begins here
            position = start.long().cumsum(1) - 1  # (B, N): the kept position each frame joins
            counts = start.sum(1)  # (B,)
        M = int(counts.max()) if B else 0
        slot = (torch.arange(B, device=frames.device)[:, None] * max(M, 1) + position)[keep]  # (K,)
        values = frames[keep]  # (K, D)
        if self.tokens:  # the expected token embedding of each kept frame, in the frames' dtype
            weights = torch.softmax(values.float() @ table.float().t(), dim=-1)  # (K, V)
            values = (weights @ table.float()).to(frames.dtype)
        out = frames.new_zeros(B * max(M, 1), D).index_add(0, slot, values)
        n = frames.new_zeros(B * max(M, 1)).index_add(0, slot, frames.new_ones(slot.shape[0]))
        out = (out / n.clamp(min=1)[:, None]).view(B, max(M, 1), D)[:, :M]
        return out, counts
