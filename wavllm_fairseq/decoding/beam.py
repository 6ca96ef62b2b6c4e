"""Beam search bookkeeping: which of each sentence's K beams live on, which hypotheses finish, and when a
sentence is done. The generator (generator.py) runs the LLM over the live rows (A sentences x K beams);
:class:`BeamSearch` turns their log-probs into the rows and tokens of the next step, as fairseq's
search.py does for its sequence generator.

A hypothesis ends with ``</s>``, at its sentence's cap, or when the loop guard stops it (the last two
closed with ``</s>`` at score 0). A sentence is done once K hypotheses ended, none is left alive, or no
live beam can beat the worst of the ``nbest`` kept.
"""
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .processing import loop_length

Beam = Tuple[List[int], List[float], float]  # a live beam: (tokens, positional scores, summed score)
Candidate = Tuple[List[int], List[float], float, int, int]  # a beam's continuation: (..., batch row, new token)


def hypothesis(tokens: List[int], positional_scores: List[float], score: float) -> dict:
    """A finished hypothesis as fairseq-generate reads it.

    Args:
        tokens (List[int]): the answer, ending in ``</s>``
        positional_scores (List[float]): each token's log-prob (0 for a ``</s>`` the decoder closed with)
        score (float): the hypothesis' (length-normalised) score

    Returns:
        dict: ``tokens`` LongTensor (T,), ``score`` float, ``positional_scores`` FloatTensor (T,), ``alignment`` None
    """
    return {"tokens": torch.tensor(tokens, dtype=torch.long), "score": float(score),
            "positional_scores": torch.tensor(positional_scores, dtype=torch.float32), "alignment": None}


@dataclass
class _Sentence:
    """One sentence: its K live beams, its finished hypotheses, its cap and id."""

    beams: List[Beam]
    finished: List[dict]
    cap: int
    cap_is_task: bool
    id: int


class BeamSearch:
    """The beams of B sentences, K per sentence, all starting from the empty answer.

    Args:
        K (int): beams per sentence
        caps (Sequence[int]): new tokens at most per sentence (B)
        cap_is_task (Sequence[bool]): whether each sentence's cap is its task's (reaching it is a guard)
        ids (Sequence[int]): the sentences' ids, for ``guard``
        eos (int): the end-of-answer token
        nbest (int): hypotheses returned per sentence
        normalize_scores (bool): a finished hypothesis scores its sum / length ** ``len_penalty`` (else its sum)
        len_penalty (float): see ``normalize_scores``
        loop_guard_ngram (int): stop a hypothesis whose tail repeats an n-gram (n <= this) 3 times (0: off)
        guard (Callable[[int, str], None]): called with (id, reason) when a cap of the task or the loop guard
            stops a hypothesis
    """

    def __init__(self, K: int, caps: Sequence[int], cap_is_task: Sequence[bool], ids: Sequence[int], *, eos: int,
                 nbest: int, normalize_scores: bool, len_penalty: float, loop_guard_ngram: int,
                 guard: Callable[[int, str], None]):
        self.K, self.eos, self.nbest = K, eos, nbest
        self.normalize_scores, self.len_penalty = normalize_scores, len_penalty
        self.loop_guard_ngram, self.guard = loop_guard_ngram, guard
        self.sentences = [_Sentence(beams=[([], [], 0.0)] * K, finished=[], cap=c, cap_is_task=t, id=i)
                          for c, t, i in zip(caps, cap_is_task, ids)]
        self.active = list(self.sentences)  # the sentences not done, in batch order (K rows each)

    def histories(self) -> List[List[int]]:
        """Returns: List[List[int]]: the tokens of every live row (A * K), in batch order."""
        return [sent.beams[k][0] for sent in self.active for k in range(self.K)]

    def advance(self, lprobs: torch.Tensor, step: int) -> Optional[Tuple[List[int], List[int]]]:
        """One step: the live rows' next-token log-probs decide every active sentence's next beams.

        Args:
            lprobs (torch.Tensor): log-probs with shape (A * K, V), after the logit processors
            step (int): the steps taken (0: every sentence's K rows are the same prefix)

        Returns:
            Optional[Tuple[List[int], List[int]]]: the batch rows the next step continues (A' * K, a row may
            repeat) and the token each gets; None when every sentence is done
        """
        K = self.K
        top_scores, top_idx = self._best_candidates(lprobs, step)
        lp = lprobs.view(len(self.active), K, -1)
        rows, tokens, still_active = [], [], []
        for a, sent in enumerate(self.active):
            live = self._next_beams(sent, a * K, top_scores[a], top_idx[a], lp[a])
            if live is None:
                continue
            sent.beams = [(t, p, s) for t, p, s, _, _ in live]
            rows += [row for _, _, _, row, _ in live]
            tokens += [tok for _, _, _, _, tok in live]
            still_active.append(sent)
        self.active = still_active
        return (rows, tokens) if still_active else None

    def results(self) -> List[List[dict]]:
        """Returns: List[List[dict]]: per sentence (B), its ``nbest`` hypotheses (:func:`hypothesis`), best first."""
        out = []
        for sent in self.sentences:
            hyps = sent.finished
            if not hyps:  # nothing ended (caps of 0): return the best live beam closed with eos
                t, p, s = sent.beams[0]
                hyps = [hypothesis(t + [self.eos], p + [0.0], self._norm(s, len(t) + 1))]
            out.append(sorted(hyps, key=lambda h: -h["score"])[: self.nbest])
        return out

    def _best_candidates(self, lprobs: torch.Tensor, step: int) -> Tuple[List[List[float]], List[List[int]]]:
        """The 2K best continuations of each active sentence's K beams: per sentence, their summed scores
        and flat indices ``k * V + token``."""
        A, K, V = len(self.active), self.K, lprobs.shape[-1]
        base = torch.tensor([sent.beams[k][2] for sent in self.active for k in range(K)], device=lprobs.device)
        if step == 0:  # all K beams are the same prefix: expand only the first
            base = base.view(A, K)
            base[:, 1:] = -math.inf
            base = base.view(-1)
        cand = (lprobs + base[:, None]).view(A, K * V)
        top_scores, top_idx = cand.topk(min(2 * K, K * V), dim=-1)
        return top_scores.tolist(), top_idx.tolist()

    def _next_beams(self, sent: _Sentence, row0: int, scores: List[float], flats: List[int],
                    lp: torch.Tensor) -> Optional[List[Candidate]]:
        """The sentence's K next live beams (padded with dead copies so the batch stays rectangular), or None
        when it is done. ``row0`` is the batch row of its first beam, ``lp`` its beams' log-probs (K, V)."""
        live = self._continuations(sent, row0, scores, flats, lp)
        if len(sent.finished) >= self.K or not live:
            return None
        # early stop: no live beam can beat the worst kept finished hypothesis
        if len(sent.finished) >= self.nbest and self._done(sent.finished, live, sent.cap):
            return None
        while len(live) < self.K:  # pad with a dead copy so the batch stays rectangular
            t, p, _, row, tok = live[0]
            live.append((t, p, -math.inf, row, tok))
        return live

    def _continuations(self, sent: _Sentence, row0: int, scores: List[float], flats: List[int],
                       lp: torch.Tensor) -> List[Candidate]:
        """Up to K live continuations, best first; a candidate that ends (``</s>``, its cap, a loop) becomes
        a finished hypothesis instead, while the sentence keeps fewer than K."""
        K, V = self.K, lp.shape[-1]
        live: List[Candidate] = []
        for s, flat in zip(scores, flats):
            if s == -math.inf:
                continue
            k, tok = divmod(flat, V)
            toks, pos, _ = sent.beams[k]
            tok_lp = float(lp[k, tok])
            if tok == self.eos:
                if len(sent.finished) < K:
                    sent.finished.append(hypothesis(toks + [tok], pos + [tok_lp], self._norm(s, len(toks) + 1)))
                continue
            new_toks, new_pos = toks + [tok], pos + [tok_lp]
            if len(new_toks) >= sent.cap or (self.loop_guard_ngram and loop_length(new_toks, self.loop_guard_ngram)):
                if len(sent.finished) < K:
                    self._finish_stopped(sent, new_toks, new_pos, s)
                continue
            live.append((new_toks, new_pos, s, row0 + k, tok))
            if len(live) == K:
                break
        return live

    def _finish_stopped(self, sent: _Sentence, toks: List[int], pos: List[float], score: float) -> None:
        """Close a hypothesis stopped at its cap or by the loop guard with ``</s>`` (a guard is reported)."""
        reason = "loop" if len(toks) < sent.cap else ("task_max_len" if sent.cap_is_task else None)
        if reason:
            self.guard(sent.id, reason)
        sent.finished.append(hypothesis(toks + [self.eos], pos + [0.0], self._norm(score, len(toks) + 1)))

    def _norm(self, total: float, length: int) -> float:
        return total / (length ** self.len_penalty) if self.normalize_scores else total

    def _done(self, finished: List[dict], live: List[Candidate], cap: int) -> bool:
        """True when the best live beam, even with no further loss, cannot beat the finished ones."""
        worst_kept = sorted(h["score"] for h in finished)[-self.nbest]
        best_live = max(s for _, _, s, _, _ in live)
        if self.normalize_scores and self.len_penalty > 0:
            # log-probs only decrease; with length normalisation a longer hypothesis can still win,
            # bounded by dividing by the longest possible length
            bound = best_live / (cap ** self.len_penalty) if best_live < 0 else best_live
        else:
            bound = best_live
        return bound < worst_kept
