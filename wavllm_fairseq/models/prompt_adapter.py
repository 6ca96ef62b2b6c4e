"""The prompt-aware LoRA weight adapter (WavLLM stage 2, paper section 3.1).

For the instruction tokens (length M) take their representation ``t`` from the frozen LLM run
WITHOUT LoRA (last decoder layer, before the final norm, as in the reference; ``model.prompt_adapter_input=
final_norm`` reads it after the final norm instead), then

    o = P_u GELU(P_d t)                     (B, M, D)   P_d: D -> K, P_u: K -> D
    a = softmax_m(W_A o)                    (B, M, 1)   padded positions masked out
    r = sum_m a_m * o_m                     (B, D)
    r = clamp(relu(r), max=clamp_max)       (optional, the reference's choice; default on)

The instruction tokens are the reference's: '"' + instruction + '"' without ``<s>``, every position
pooled (``WavLLMModel.prompt_lora_scale``). One choice the paper leaves open (``init_scale``): P_u
starts at zero with bias alpha / R.

and every LoRA layer computes ``h = W0 x + (B A x) * r`` for all positions of that utterance.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class PromptAwareLoRAScale(nn.Module):
    """Maps instruction hidden states (B, M, D) + their padding mask to one LoRA scale r (B, D).

    Args:
        dim (int): the LLM width D.
        hidden_dim (int): the bottleneck K of P_d / P_u.
        clamp_max (Optional[float]): r = clamp(relu(r), max=clamp_max); None or <= 0: no relu, no clamp.
        init_scale (Optional[float]): start with r == init_scale for every prompt (:meth:`reset_to_constant`);
            None: PyTorch's default Linear init.
    """

    def __init__(self, dim: int, hidden_dim: int, clamp_max: Optional[float] = 3.0,
                 init_scale: Optional[float] = None):
        super().__init__()
        self.down = nn.Linear(dim, hidden_dim)  # P_d
        self.up = nn.Linear(hidden_dim, dim)  # P_u
        self.attention = nn.Linear(dim, 1)  # W_A
        self.clamp_max = clamp_max if clamp_max is not None and clamp_max > 0 else None
        self.init_scale = init_scale
        self.reset_to_constant()

    def reset_to_constant(self) -> None:
        """With ``init_scale`` set: ``P_u`` weight 0 and bias ``init_scale``, so ``r == init_scale`` for
        every prompt (stage 2 starts exactly at stage 1's LoRA scale alpha / R, inside the linear range
        of relu/clamp where gradients flow); ``P_u`` learns first, as LoRA's B does. A no-op on the meta
        device or without ``init_scale``."""
        if self.init_scale is None or self.up.weight.is_meta:
            return
        with torch.no_grad():
            self.up.weight.zero_()
            self.up.bias.fill_(float(self.init_scale))

    def forward(self, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The formula of the module docstring.

        Args:
            t (torch.Tensor): instruction hidden states with shape (B, M, D).
            mask (torch.Tensor): bool with shape (B, M), True on real tokens (at least one per row).

        Returns:
            torch.Tensor: r with shape (B, D).
        """
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every instruction needs at least one token for the prompt adapter")
        o = self.up(F.gelu(self.down(t.to(self.down.weight.dtype))))  # (B, M, D)
        scores = self.attention(o).squeeze(-1).float()  # (B, M)
        scores = scores.masked_fill(~mask, float("-inf"))
        a = torch.softmax(scores, dim=1).to(o.dtype)  # (B, M)
        r = torch.einsum("bm,bmd->bd", a, o)  # (B, D)
        if self.clamp_max is not None:
            r = torch.clamp(torch.relu(r), max=self.clamp_max)
        return r
