"""What decides the next token from the LLM's scores: the logit processors (repetition penalty, n-gram
blocking, minimum length, banned ids), greedy choice or top-k / top-p sampling, and the loop test that
the generator's loop guard stops a hypothesis on.
"""
import math
from typing import List, Sequence

import torch

LOOP_REPEATS = 3  # an n-gram repeated this many times back to back at the tail is a loop


def loop_length(tokens: Sequence[int], max_n: int, repeats: int = LOOP_REPEATS) -> int:
    """The length of the n-gram that the tail of ``tokens`` repeats.

    Args:
        tokens (Sequence[int]): a hypothesis so far
        max_n (int): longest n-gram looked for
        repeats (int): back-to-back repetitions that make a loop

    Returns:
        int: n if the tail of ``tokens`` is one n-gram (n <= max_n) repeated ``repeats`` times, else 0
    """
    for n in range(1, max_n + 1):
        if len(tokens) < n * repeats:
            break
        tail = tokens[-n:]
        if all(list(tokens[-(k + 1) * n: len(tokens) - k * n]) == list(tail) for k in range(1, repeats)):
            return n
    return 0


def penalize_repetitions(scores: torch.Tensor, histories: List[List[int]], penalty: float) -> None:
    """CTRL's repetition penalty, in place: a token already in a row's history gets its score divided by
    ``penalty`` where positive, multiplied by it where negative.

    Args:
        scores (torch.Tensor): log-probs or logits with shape (N, V), changed in place
        histories (List[List[int]]): tokens generated so far, one list per row (N)
        penalty (float): the penalty (1 = off)
    """
    for i, hist in enumerate(histories):
        if hist:
            idx = torch.tensor(sorted(set(hist)), device=scores.device)
            v = scores[i, idx]
            scores[i, idx] = torch.where(v > 0, v / penalty, v * penalty)


def block_repeated_ngrams(scores: torch.Tensor, histories: List[List[int]], n: int) -> None:
    """fairseq's ``--no-repeat-ngram-size``, in place: a token that would complete an n-gram already in a
    row's history gets ``-inf``.

    Args:
        scores (torch.Tensor): log-probs or logits with shape (N, V), changed in place
        histories (List[List[int]]): tokens generated so far, one list per row (N)
        n (int): the n-gram size (> 0)
    """
    for i, hist in enumerate(histories):
        if len(hist) >= n - 1:
            key = tuple(hist[len(hist) - n + 1:]) if n > 1 else ()
            banned = {hist[j + n - 1] for j in range(len(hist) - n + 1) if tuple(hist[j: j + n - 1]) == key}
            if banned:
                scores[i, list(banned)] = -math.inf


def sample_next(logits: torch.Tensor, temperature: float, topk: int, topp: float) -> torch.Tensor:
    """Draw one token per row from ``softmax(logits / temperature)`` restricted to the ``topk`` most likely
    tokens (``topk > 0``) and to the smallest set whose probability reaches ``topp`` (``0 < topp < 1``).

    Args:
        logits (torch.Tensor): next-token scores with shape (N, V)
        temperature (float): softmax temperature (> 0)
        topk (int): keep this many tokens (<= 0: all)
        topp (float): nucleus mass (outside (0, 1): off)

    Returns:
        torch.Tensor: the drawn token ids with shape (N,)
    """
    logits = logits / temperature
    if topk > 0:
        kth = logits.topk(min(topk, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if 0 < topp < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > topp  # keep the smallest set whose mass reaches topp
        sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1).squeeze(-1)
