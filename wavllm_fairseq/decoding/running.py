"""Greedy and sampled decoding over a batch whose rows come and go at step boundaries (:class:`RunningBatch`).

The generator's greedy loop (``WavLLMGenerator.decode`` with one beam: :func:`decode_rows`) is one
``RunningBatch`` whose rows all join at the start; a server's engine (serve/schedulers.py) also joins
newcomers between steps (continuous batching)::

    join(M newcomers)   prefill them (a prefix the model built: encoders, template); their keys/values and
                        the running rows' are placed left-padded into one cache (every row's last token in
                        the last column; the static path starts its step again over it); their next-token
                        logits come after the running rows'
    advance()           choose one token per live row; rows that end (</s>, their cap, a loop, a stop asked by
                        on_step) leave at once with their hypothesis; one LLM step for the others

A row computes what it computes alone: its positions count from its own first token, padding is masked,
and the logit processors see only its own history and length (the minimum length counts its own steps).
"""
from dataclasses import dataclass, field
from typing import Dict, Hashable, Iterable, List, Optional, Sequence, Tuple

import torch

from ..models.wavllm import GenerationPrefix
from .beam import hypothesis
from .processing import loop_length
from .state import DecodeState


@dataclass
class _Row:
    cap: int  # new tokens at most
    cap_is_task: bool  # reaching the cap is a guard
    id: int  # the row's id in the guard log lines
    tokens: List[int] = field(default_factory=list)
    scores: List[float] = field(default_factory=list)


class RunningBatch:
    """Greedy or sampled decoding of rows that join between steps and leave when they end.

    Args:
        generator (WavLLMGenerator): decodes (its options, prefill, step and token choice); beam size 1

    Rows are named by keys (any hashable, unique among the live rows); ``len(batch)`` is the live rows.
    """

    def __init__(self, generator):
        self.gen = generator
        self.state: Optional[DecodeState] = None
        self.keys: List[Hashable] = []  # the live rows, in batch order
        self.logits: Optional[torch.Tensor] = None  # (N, V) next-token logits of the live rows
        self._rows: Dict[Hashable, _Row] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def join(self, prefix: GenerationPrefix, caps: Sequence[int], keys: Iterable[Hashable],
             ids: Optional[Sequence[int]] = None, cap_is_task: Optional[Sequence[bool]] = None) -> None:
        """Prefill new rows; they are decoded from the next :meth:`advance` on.

        Args:
            prefix (GenerationPrefix): the newcomers' prefix: embeds (M, L, D) left-padded, attention_mask (M, L),
                lora_scale (M, D)
            caps (Sequence[int]): new tokens at most per newcomer (M)
            keys (Iterable[Hashable]): their keys (M), none of them live
            ids (Optional[Sequence[int]]): their ids in the guard log lines (default: the keys)
            cap_is_task (Optional[Sequence[bool]]): per newcomer, whether its cap is its task's (default: no)
        """
        keys = list(keys)
        if len(set(keys)) != len(keys) or set(keys) & set(self._rows):
            raise ValueError(f"row keys must be unique among the live rows: {keys} joining {self.keys}")
        ids = list(ids) if ids is not None else keys
        tasks = list(cap_is_task) if cap_is_task is not None else [False] * len(keys)
        if self.state is None:
            state = DecodeState(caps=list(caps), cap_is_task=tasks)
            self.logits = self.gen.prefill(prefix, state)
            self.state = state
        else:
            room = max([r.cap - len(r.tokens) for r in self._rows.values()] + [int(c) for c in caps])
            self.logits = torch.cat([self.logits, self.gen.join(prefix, self.state, room)])
        for key, cap, i, task in zip(keys, caps, ids, tasks):
            self._rows[key] = _Row(int(cap), bool(task), i)
        self.keys += keys

    def advance(self, on_step=None) -> List[Tuple[Hashable, dict]]:
        """Choose each live row's next token, let the rows that end leave, and step the others.

        Args:
            on_step (Optional[Callable]): ``on_step(keys, tokens)`` with the live rows' keys and the token each
                just chose; it may return keys of rows to end now: they close with ``</s>`` after this token

        Returns:
            List[Tuple[Hashable, dict]]: the rows that ended, each with its hypothesis ``{"tokens" (T,), "score",
            "positional_scores" (T,), "alignment"}`` (``tokens`` ending in ``</s>``)
        """
        gen, rows = self.gen, [self._rows[k] for k in self.keys]
        nxt, chosen = gen.pick(self.logits, [r.tokens for r in rows])
        nxt_list = nxt.tolist()
        stop = set(on_step(list(self.keys), nxt_list) or ()) if on_step is not None else ()
        keep, done = [], []
        for j, (key, row) in enumerate(zip(self.keys, rows)):
            row.tokens.append(nxt_list[j])
            row.scores.append(chosen[j])
            if self._ends(row, key in stop):
                done.append((key, self._hypothesis(row)))
                del self._rows[key]
            else:
                keep.append(j)
        if not keep:
            self.state, self.keys, self.logits = None, [], None
            return done
        if len(keep) < len(self.keys):
            index = torch.tensor(keep, device=nxt.device)
            self.state.select(index)
            nxt = nxt.index_select(0, index)
            self.keys = [self.keys[j] for j in keep]
        self.logits = gen.step(self.state, nxt)
        return done

    def _ends(self, row: _Row, stopped: bool) -> bool:
        """Whether the row ends after its last token (closed with ``</s>`` unless that token is ``</s>``)."""
        gen = self.gen
        if row.tokens[-1] == gen.eos:
            return True
        ends = stopped
        if not ends and len(row.tokens) >= row.cap:
            if row.cap_is_task:
                gen.guard(row.id, "task_max_len", f"len={row.cap}")
            ends = True
        if not ends and gen.loop_guard_ngram:
            n = loop_length(row.tokens, gen.loop_guard_ngram)
            if n:
                gen.guard(row.id, "loop", f"ngram={n}")
                ends = True
        if ends:
            row.tokens.append(gen.eos)
            row.scores.append(0.0)
        return ends

    def _hypothesis(self, row: _Row) -> dict:
        score = float(torch.tensor(row.scores, dtype=torch.float32).sum())
        norm = len(row.scores) ** self.gen.len_penalty if self.gen.normalize_scores else 1.0
        return hypothesis(row.tokens, row.scores, score / norm)


def decode_rows(generator, prefix: GenerationPrefix, caps: Sequence[int], ids: Sequence[int],
                cap_is_task: Sequence[bool], on_step=None) -> List[List[dict]]:
    """Greedy or sampled decoding of a batch whose rows all start together (``WavLLMGenerator.decode``).

    Args:
        generator (WavLLMGenerator): decodes (beam size 1)
        prefix (GenerationPrefix): embeds (B, L, D) left-padded, attention_mask (B, L), lora_scale (B, D)
        caps (Sequence[int]): new tokens at most per row (B)
        ids (Sequence[int]): the rows' ids in the guard log lines (B)
        cap_is_task (Sequence[bool]): per row, whether its cap is its task's
        on_step (Optional[Callable]): ``on_step(rows, tokens)`` of :meth:`RunningBatch.advance`, rows by batch index

    Returns:
        List[List[dict]]: per row, its one hypothesis (``RunningBatch.advance``'s)
    """
    run = RunningBatch(generator)
    run.join(prefix, caps, range(len(caps)), ids=ids, cap_is_task=cap_is_task)
    done = {}
    while run:
        done.update(run.advance(on_step))
    return [[done[b]] for b in range(len(caps))]
