"""What the schedulers share: a request (:class:`Job`), its answer, its decoding settings, and the engine that
owns the model, takes jobs and hands answers back (:class:`Engine`; the schedulers are schedulers.py's).

One worker thread owns the model; handlers on the event loop submit jobs and get tokens and answers back
through callbacks the worker calls::

    handlers (event loop) --submit(Job)--> queue --> worker thread (a scheduler's _loop):
                                                     collate -> generator (prefill, steps)
    handlers <--on_token(id) / on_done(Answer)------ (called from the worker thread)

``submit`` refuses a job (:class:`EngineBusy`) when ``max_queue`` jobs already wait or the engine stopped
accepting (a server shutting down); the jobs taken still decode to their end. Batch invariance: each row's
length cap is its own ``max_tokens`` and greedy rows compute what they compute alone (decoding/generator.py),
so a greedy answer does not depend on which requests shared its batch. Sampling requests batch with
sampling requests of the same temperature/top-p; one that sets ``seed`` decodes alone, so the seed
reproduces its answer. A job whose ``cancelled`` event is set (its client left, or its time ran out) ends
at the next step.
"""
import itertools
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from ..data.dataset import collate, inference_item
from ..data.prompt_template import EncodedPrompt
from ..decoding.generator import WavLLMGenerator
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
        """Returns: Tuple: requests whose keys are equal may share a batch."""
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
    batch_size: int  # the most requests its batch held while it decoded


@dataclass
class Job:
    """One request: its encoded prompt and audio, settings, and the callbacks the worker calls."""

    enc: EncodedPrompt
    audio: Optional[np.ndarray]  # (T,) float32 16 kHz mono, or None for a text-only question
    max_tokens: int
    decoding: Decoding = Decoding()
    on_token: Optional[Callable[[int], None]] = None  # each generated token id, from the worker thread
    on_done: Optional[Callable[[object], None]] = None  # an Answer, or the exception that failed its batch
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = 0
    arrival: float = field(default_factory=time.monotonic)
    first_token: Optional[float] = None  # time.monotonic() of its first token
    batch_peak: int = 0  # the most rows its batch held

    @property
    def cap(self) -> int:
        """Returns: int: new tokens at most."""
        return max(1, int(self.max_tokens))


class EngineBusy(Exception):
    """``submit`` refused a job: ``reason`` "queue_full" (retry after ``retry_after`` seconds) or "shutting_down"."""

    def __init__(self, reason: str, message: str, retry_after: Optional[int] = None):
        super().__init__(message)
        self.reason, self.retry_after = reason, retry_after


class Engine:
    """Owns a loaded :class:`~wavllm_fairseq.hub.WavLLM` and decodes submitted jobs on one worker thread; a
    scheduler (schedulers.py) subclasses it with the worker's ``_loop``.

    Args:
        api (WavLLM): the loaded model, tokenizer and task
        max_batch (int): most requests decoded together
        max_wait_ms (float): how long a batch's first request waits for others (the batch scheduler)
        loop_guard_ngram (int): stop an answer whose tail repeats an n-gram (n <= this) 3 times; 0: off
        static (Optional[bool]): the decoding path (None: static with CUDA graphs on a GPU, dynamic on a CPU)
        compile_step (bool): compile the static path's layer step (decoding/static_decode.py)
        max_queue (int): most jobs waiting to decode; ``submit`` refuses more (0: no limit)
    """

    scheduler = "none"

    def __init__(self, api, max_batch: int = 8, max_wait_ms: float = 20.0, loop_guard_ngram: int = 4,
                 static: Optional[bool] = None, compile_step: bool = False, max_queue: int = 0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.api = api
        self.max_batch = int(max_batch)
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self.loop_guard_ngram = int(loop_guard_ngram)
        self.static, self.compile_step = static, bool(compile_step)
        self.max_queue = max(0, int(max_queue))
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "answer_tokens": 0, "cancelled": 0,
                      "failed_batches": 0, "joins": 0, "refused": 0}
        self.observer = None  # metrics.py's ServeMetrics: first_token(s), finished(answer, s), tokens(n)
        self.accepting = True
        self._lock = threading.Lock()
        self._waiting = 0  # submitted, not decoding yet
        self._running = 0  # rows decoding now
        self._latency = 0.0  # a running mean of answered requests' seconds (Retry-After's estimate)
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._ids = itertools.count()
        api.model.eval()
        self._thread = threading.Thread(target=self._work, name=f"wavllm-{self.scheduler}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public
    @property
    def context_length(self) -> int:
        """Returns: int: the LLM's context (prompt + speech + answer positions)."""
        return int(self.api.model.context_length)

    def speech_tokens(self, n_samples: int) -> int:
        """LLM positions a clip takes.

        Args:
            n_samples (int): the clip's 16 kHz samples (0: no clip)

        Returns:
            int: its speech positions
        """
        if n_samples <= 0:
            return 0
        return int(self.api.model.speech_frames(torch.tensor([n_samples]))[0])

    def submit(self, job: Job) -> Job:
        """Queue a job for decoding.

        Args:
            job (Job): the request

        Returns:
            Job: the job, its ``id`` and ``arrival`` set

        Raises:
            EngineBusy: the queue holds ``max_queue`` jobs, or the engine stopped accepting
        """
        with self._lock:
            if not self.accepting:
                self.stats["refused"] += 1
                raise EngineBusy("shutting_down", "the server is shutting down and takes no new requests")
            if self.max_queue and self._waiting >= self.max_queue:
                self.stats["refused"] += 1
                raise EngineBusy("queue_full", f"{self._waiting} requests are waiting, the server's limit "
                                               "(wavllm-serve --max-queue); retry later", self._retry_after())
            self._waiting += 1
        job.id = next(self._ids)
        job.arrival = time.monotonic()
        self._queue.put(job)
        return job

    def waiting(self) -> int:
        """Returns: int: jobs submitted and not decoding yet."""
        return self._waiting

    def running(self) -> int:
        """Returns: int: rows decoding now (the running batch's size)."""
        return self._running

    def stop_accepting(self) -> None:
        """Refuse new jobs from now on; the jobs taken still decode to their end."""
        with self._lock:
            self.accepting = False

    def close(self) -> None:
        """Stop the worker once the jobs taken have decoded (waits up to 30 s)."""
        self.stop_accepting()
        self._queue.put(None)
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ for the schedulers
    def _work(self) -> None:
        with torch.inference_mode():
            self._loop()

    def _loop(self) -> None:
        raise NotImplementedError

    def _retry_after(self) -> int:
        """Seconds until the queue has room, roughly: its jobs' share of the batch times a request's latency."""
        return max(1, math.ceil(self._latency * (self._waiting + 1) / self.max_batch))

    def _started(self, jobs: List[Job]) -> List[Job]:
        """Jobs leave the queue: those whose client left while they waited end now; returns the others."""
        live = []
        with self._lock:
            self._waiting -= len(jobs)
        for job in jobs:
            if job.cancelled.is_set():
                self.stats["cancelled"] += 1
                _call(job.on_done, Answer("", [], "cancelled", len(job.enc.pre) + len(job.enc.post), 0, 0))
            else:
                live.append(job)
        self.stats["requests"] += len(live)
        return live

    def _generator(self, d: Decoding, max_len: int) -> WavLLMGenerator:
        options = DecodingOptions(max_len_b=max_len, sampling=d.sampling,
                                  temperature=d.temperature if d.sampling else 1.0,
                                  sampling_topp=d.top_p if d.top_p < 1 else -1.0, sampling_topk=d.top_k,
                                  loop_guard_ngram=self.loop_guard_ngram, static=self.static,
                                  compile_step=self.compile_step)
        return options.build(self.api.model, self.api.task.target_dictionary)

    @staticmethod
    def _seed(d: Decoding) -> None:
        """Seed torch's generator before a sampled batch: the request's seed, else the clock."""
        if d.sampling:
            torch.manual_seed(d.seed if d.seed is not None else int(time.time_ns() % (2 ** 31)))

    def _sample(self, jobs: List[Job]) -> dict:
        """The collated batch of ``jobs`` on the model's device, each row capped at its own ``max_tokens``."""
        items = [inference_item(i, j.audio, j.enc, utt_id=str(j.id)) for i, j in enumerate(jobs)]
        batch = batch_to(collate(items, self.api.tokenizer.pad_id), self.api.device)
        batch["max_len"] = [j.cap for j in jobs]
        return batch

    def _token(self, job: Job, token: int, batch: int) -> None:
        if job.first_token is None:
            job.first_token = time.monotonic()
            if self.observer is not None:
                self.observer.first_token(job.first_token - job.arrival)
        job.batch_peak = max(job.batch_peak, batch)
        if self.observer is not None:
            self.observer.tokens(1)
        _call(job.on_token, token)

    def _finish(self, job: Job, ids: List[int]) -> None:
        """Hand ``job`` its answer (``ids``: the decoded tokens, ``</s>`` included)."""
        tok = self.api.tokenizer
        answer = ids[:-1] if ids and ids[-1] == tok.eos_id else ids
        if job.cancelled.is_set():
            reason = "cancelled"
            self.stats["cancelled"] += 1
        else:
            reason = "length" if len(answer) >= job.cap else "stop"
        self.stats["answer_tokens"] += len(answer)
        n = 0 if job.audio is None else len(job.audio)
        result = Answer(text=tok.decode(ids), tokens=answer, finish_reason=reason,
                        text_tokens=len(job.enc.pre) + len(job.enc.post), speech_tokens=self.speech_tokens(n),
                        batch_size=job.batch_peak)
        seconds = time.monotonic() - job.arrival
        if reason != "cancelled":
            self._latency = seconds if not self._latency else 0.9 * self._latency + 0.1 * seconds
        if self.observer is not None:
            self.observer.finished(result, seconds)
        _call(job.on_done, result)

    def _fail(self, jobs: List[Job], error: Exception) -> None:
        logger.error(f"decoding a batch of {len(jobs)} failed: {type(error).__name__}: {error}", exc_info=error)
        self.stats["failed_batches"] += 1
        for job in jobs:
            _call(job.on_done, error)


def _call(fn, arg) -> None:
    if fn is None:
        return
    try:
        fn(arg)
    except Exception:  # noqa: BLE001 - a client's callback must not stop the worker
        logger.exception("a request callback failed")
