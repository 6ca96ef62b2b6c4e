"""Dynamic batching: requests that arrive within ``max_wait_ms`` of each other decode as one batch.

One worker thread owns the model. It takes the oldest waiting request, then every request that
arrives within ``max_wait_ms`` of it (up to ``max_batch``) and decodes with the same settings, and
runs them through the batched generator (left-padded prefixes; finished rows leave the batch). A
request that arrives while a batch decodes waits for the next batch (no joining mid-decode)::

    handlers (event loop) --submit(Job)--> queue --> worker thread: collect <= max_batch jobs
                                                     collate -> WavLLMGenerator.generate(on_step=...)
    handlers <--on_token(id) / on_done(Answer)------ (called from the worker thread)

Batch invariance: each row's length cap is its own ``max_tokens`` (the sample's per-row ``max_len``)
and greedy rows compute what they compute alone (generator.py), so a greedy answer does not depend on
which requests shared its batch. Sampling requests batch with other sampling requests of the same
temperature/top-p; one that sets ``seed`` decodes alone, so the seed reproduces its answer.

Streaming and cancelling go through the generator's ``on_step`` hook: after each step it reports the
live rows and their new tokens (sent to each request's stream) and ends the rows whose client left.
On a GPU the generator's static decoder is held by the model, so its buffers and captured graphs
serve every batch.
"""
import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, List, Optional, Tuple

import numpy as np
import torch

from ..data.dataset import collate, inference_item
from ..data.prompt_template import EncodedPrompt
from ..decoding.options import DecodingOptions
from ..hub import batch_to

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decoding:
    """Decoding settings of one request; requests batch together only when these are equal."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = -1
    seed: Optional[int] = None

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def batch_key(self, job_id: int) -> Tuple:
        if not self.sampling:
            return ("greedy",)
        if self.seed is not None:  # a seeded sample is reproducible only alone
            return ("seeded", job_id)
        return ("sample", self.temperature, self.top_p, self.top_k)


@dataclass
class Answer:
    """What a finished request gets back."""

    text: str
    tokens: List[int]  # answer tokens, without the closing </s>
    finish_reason: str  # "stop" (</s> or a loop guard), "length" (max_tokens reached) or "cancelled"
    text_tokens: int  # prompt template + instruction tokens
    speech_tokens: int  # LLM positions the speech takes (80 ms each)
    batch_size: int  # how many requests shared the batch


@dataclass
class Job:
    """One request: its encoded prompt and audio, settings, and the callbacks the worker calls."""

    enc: EncodedPrompt
    audio: Optional[np.ndarray]  # (T,) float32 16 kHz mono, or None for a text-only question
    max_tokens: int
    decoding: Decoding = Decoding()
    on_token: Optional[Callable[[int], None]] = None  # each generated token id, from the worker thread
    on_done: Optional[Callable[[object], None]] = None  # an Answer, or the exception that failed the batch
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = 0
    arrival: float = field(default_factory=time.monotonic)


class BatchEngine:
    """Owns a loaded :class:`~wavllm_fairseq.hub.WavLLM` and decodes submitted jobs in dynamic batches.

    ``static`` picks the decoding path (None: static with CUDA graphs on a GPU, dynamic on a CPU; see
    generator.py), ``compile_step`` compiles the static path's layer step (static_decode.py)."""

    def __init__(self, api, max_batch: int = 8, max_wait_ms: float = 20.0, loop_guard_ngram: int = 4,
                 static: Optional[bool] = None, compile_step: bool = False):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.api = api
        self.max_batch = int(max_batch)
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self.loop_guard_ngram = int(loop_guard_ngram)
        self.static, self.compile_step = static, bool(compile_step)
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "answer_tokens": 0, "cancelled": 0,
                      "failed_batches": 0}
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="wavllm-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public
    @property
    def context_length(self) -> int:
        return int(self.api.model.context_length)

    def speech_tokens(self, n_samples: int) -> int:
        if n_samples <= 0:
            return 0
        return int(self.api.model.speech_frames(torch.tensor([n_samples]))[0])

    def submit(self, job: Job) -> Job:
        job.id = next(self._ids)
        job.arrival = time.monotonic()
        self._queue.put(job)
        return job

    def waiting(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ worker
    def _loop(self) -> None:
        pending: Deque[Job] = deque()  # taken from the queue but not batchable with the batch being built
        stop = False
        while not (stop and not pending):
            first = pending.popleft() if pending else self._queue.get()
            if first is None:
                break
            key = first.decoding.batch_key(first.id)
            batch = [first]
            for job in list(pending):  # earlier arrivals with the same settings first
                if len(batch) < self.max_batch and job.decoding.batch_key(job.id) == key:
                    pending.remove(job)
                    batch.append(job)
            deadline = first.arrival + self.max_wait
            while len(batch) < self.max_batch and not stop:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                elif job.decoding.batch_key(job.id) == key:
                    batch.append(job)
                else:
                    pending.append(job)
            live = []
            for job in batch:
                if job.cancelled.is_set():  # the client left while it waited
                    self.stats["cancelled"] += 1
                    _call(job.on_done, _cancelled_answer(job, len(batch)))
                else:
                    live.append(job)
            if live:
                self._run(live)

    def _run(self, jobs: List[Job]) -> None:
        B = len(jobs)
        self.stats["requests"] += B
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], B)
        tok = self.api.tokenizer
        items = [inference_item(i, j.audio, j.enc, utt_id=str(j.id)) for i, j in enumerate(jobs)]
        d = jobs[0].decoding
        caps = [max(1, int(j.max_tokens)) for j in jobs]

        def on_step(rows: List[int], tokens: List[int]) -> List[int]:
            for b, t in zip(rows, tokens):
                _call(jobs[b].on_token, t)
            return [b for b in rows if jobs[b].cancelled.is_set()]  # clients that left: end their rows

        options = DecodingOptions(max_len_b=max(caps), sampling=d.sampling,
                                  temperature=d.temperature if d.sampling else 1.0,
                                  sampling_topp=d.top_p if d.top_p < 1 else -1.0, sampling_topk=d.top_k,
                                  loop_guard_ngram=self.loop_guard_ngram, static=self.static,
                                  compile_step=self.compile_step)
        gen = options.build(self.api.model, self.api.task.target_dictionary)
        try:
            batch = batch_to(collate(items, tok.pad_id), self.api.device)
            batch["max_len"] = caps
            if d.sampling:
                torch.manual_seed(d.seed if d.seed is not None else int(time.time_ns() % (2 ** 31)))
            with torch.inference_mode():
                hyps = gen.generate([self.api.model], batch, on_step=on_step)
        except Exception as e:  # noqa: BLE001 - the batch's clients get the error, the server keeps serving
            logger.exception(f"decoding a batch of {B} failed")
            self.stats["failed_batches"] += 1
            for j in jobs:
                _call(j.on_done, e)
            return
        for b, (job, nbest) in enumerate(zip(jobs, hyps)):
            ids = nbest[0]["tokens"].tolist()
            answer = ids[:-1] if ids and ids[-1] == tok.eos_id else ids
            if job.cancelled.is_set():
                reason = "cancelled"
                self.stats["cancelled"] += 1
            else:
                reason = "length" if len(answer) >= caps[b] else "stop"
            self.stats["answer_tokens"] += len(answer)
            n = 0 if job.audio is None else len(job.audio)
            _call(job.on_done, Answer(text=tok.decode(ids), tokens=answer, finish_reason=reason,
                                      text_tokens=len(job.enc.pre) + len(job.enc.post),
                                      speech_tokens=self.speech_tokens(n), batch_size=B))


def _cancelled_answer(job: Job, batch_size: int) -> Answer:
    return Answer("", [], "cancelled", len(job.enc.pre) + len(job.enc.post), 0, batch_size)


def _call(fn, arg) -> None:
    if fn is None:
        return
    try:
        fn(arg)
    except Exception:  # noqa: BLE001 - a client's callback must not stop the worker
        logger.exception("a request callback failed")

