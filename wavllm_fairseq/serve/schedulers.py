"""The engine's two schedulers (``wavllm-serve --scheduler``): how waiting requests become decoding rows.

``continuous`` (the default, :class:`ContinuousEngine`): requests join the running batch at a step boundary.
Between two steps the worker takes every waiting request with the running batch's settings (up to
``max_batch`` rows), prefills them (encoders included) and places their keys/values with the running rows'
(decoding/running.py: left-padded into one cache on the dynamic path; the static path starts its step
again over the joined cache, with a power-of-two slot count). A row that ends leaves at once and its
client gets its answer then. Requests are taken in arrival order: one with other settings (a sampled
request while greedy rows run, or a seeded one, which decodes alone) waits for the running batch to end,
and nobody behind it joins meanwhile::

    queue --> [join newcomers] --> step --> rows that ended: answered --> [join] --> step --> ...

``batch`` (:class:`BatchEngine`): the oldest waiting request, then every request arriving within
``max_wait_ms`` with its settings (up to ``max_batch``), decode as one batch to its end; a request that
arrives meanwhile waits for the next batch, and every client of a batch gets its answer when the
batch ends.
"""
import queue
import time
from collections import deque
from typing import Deque, Dict, List, Optional

from ..decoding.running import RunningBatch
from .engine import Engine, Job


class BatchEngine(Engine):
    """Batch at a time: requests arriving within ``max_wait_ms`` decode together to the end (module docstring).

    Args: those of :class:`~.engine.Engine`.
    """

    scheduler = "batch"

    def _loop(self) -> None:
        pending: Deque[Job] = deque()  # taken from the queue but not batchable with the batch being built
        stop = False
        while not (stop and not pending):
            first = pending.popleft() if pending else self._queue.get()
            if first is None:
                break
            batch, stop = self._collect(first, pending, stop)
            live = self._started(batch)
            if live:
                self._run(live)

    def _collect(self, first: Job, pending: Deque[Job], stop: bool):
        """``first`` and the jobs that batch with it: earlier arrivals with its settings, then arrivals
        within ``max_wait`` of it. Returns (the batch, whether the queue said stop)."""
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
        return batch, stop

    def _run(self, jobs: List[Job]) -> None:
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        d = jobs[0].decoding
        gen = self._generator(d, max(j.cap for j in jobs))

        def on_step(rows: List[int], tokens: List[int]) -> List[int]:
            self._running = len(rows)
            for b, t in zip(rows, tokens):
                self._token(jobs[b], t, len(rows))
            return [b for b in rows if jobs[b].cancelled.is_set()]  # clients that left: end their rows

        self._running = len(jobs)
        try:
            batch = self._sample(jobs)
            self._seed(d)
            hyps = gen.generate([self.api.model], batch, on_step=on_step)
        except Exception as e:  # noqa: BLE001 - the batch's clients get the error, the server keeps serving
            self._fail(jobs, e)
            return
        finally:
            self._running = 0
        for job, nbest in zip(jobs, hyps):
            self._finish(job, nbest[0]["tokens"].tolist())


class ContinuousEngine(Engine):
    """Continuous batching: requests join the running batch between steps, rows leave when they end
    (module docstring).

    Args: those of :class:`~.engine.Engine` (``max_wait_ms`` is not used: a request joins at the next step).
    """

    scheduler = "continuous"

    def _loop(self) -> None:
        self._pending: Deque[Job] = deque()  # arrived, not admitted yet, oldest first
        self._jobs: Dict[int, Job] = {}  # the running rows, by job id
        self._batch: Optional[RunningBatch] = None
        self._gen = None  # the running batch's generator
        self._key = None  # the running batch's settings (Decoding.batch_key)
        stop = False
        while not (stop and not self._pending and not self._jobs):
            stop = self._arrivals(block=not self._jobs and not self._pending) or stop
            newcomers = self._admit()
            if newcomers:
                self._join(newcomers)
            if self._jobs:
                self._step()

    def _arrivals(self, block: bool) -> bool:
        """Move the queue's jobs to the pending list (waiting for one when ``block``); True if told to stop."""
        stop = False
        try:
            job = self._queue.get() if block else self._queue.get_nowait()
            while True:
                if job is None:
                    stop = True
                else:
                    self._pending.append(job)
                job = self._queue.get_nowait()
        except queue.Empty:
            pass
        return stop

    def _admit(self) -> List[Job]:
        """The pending jobs that join now: in arrival order while they have the running batch's settings."""
        for job in [j for j in self._pending if j.cancelled.is_set()]:  # clients that left while waiting
            self._pending.remove(job)
            self._started([job])
        taken: List[Job] = []
        while self._pending and len(self._jobs) + len(taken) < self.max_batch:
            key = self._pending[0].decoding.batch_key(self._pending[0].id)
            if self._jobs or taken:
                if key != self._key:
                    break  # an older request with other settings waits for the running batch to end
            else:
                self._key = key
            taken.append(self._pending.popleft())
        return self._started(taken)

    def _join(self, jobs: List[Job]) -> None:
        if not self._jobs:  # a new batch
            self._gen = self._generator(jobs[0].decoding, self.context_length)
            self._seed(jobs[0].decoding)
            self._batch = RunningBatch(self._gen)
            self.stats["batches"] += 1
        try:
            prefix, caps, cap_is_task = self._gen.build_prefix(self._sample(jobs))
        except Exception as e:  # noqa: BLE001 - the newcomers' clients get the error, the running rows go on
            self._fail(jobs, e)
            return
        if self._jobs:
            self.stats["joins"] += len(jobs)
        try:
            self._batch.join(prefix, caps, [j.id for j in jobs], cap_is_task=cap_is_task)
        except Exception as e:  # noqa: BLE001 - the batch's clients get the error, the server keeps serving
            self._fail(list(self._jobs.values()) + jobs, e)
            self._jobs, self._batch = {}, None
            return
        self._jobs.update((j.id, j) for j in jobs)
        self._running = len(self._jobs)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(self._jobs))

    def _on_step(self, keys: List[int], tokens: List[int]) -> List[int]:
        for k, t in zip(keys, tokens):
            self._token(self._jobs[k], t, len(keys))
        return [k for k in keys if self._jobs[k].cancelled.is_set()]  # clients that left or timed out

    def _step(self) -> None:
        try:
            done = self._batch.advance(self._on_step)
        except Exception as e:  # noqa: BLE001 - the batch's clients get the error, the server keeps serving
            self._fail(list(self._jobs.values()), e)
            self._jobs, self._batch, self._running = {}, None, 0
            return
        for key, hyp in done:
            self._finish(self._jobs.pop(key), hyp["tokens"].tolist())
        self._running = len(self._jobs)


SCHEDULERS = {"continuous": ContinuousEngine, "batch": BatchEngine}
