"""The engine's schedulers in process, on a tiny random stage-2 checkpoint (per-row prompt-aware LoRA scale),
float32 on the CPU: requests that join the running batch mid-decode (continuous), on the dynamic path and on
the static path (its step run eagerly, as a GPU's graph would run it), streamed and not, answer what each
answers alone; rows leave as they end; a request with other settings waits for the running batch, and nobody
overtakes it; a cancelled row ends and the others go on; the batch scheduler keeps a request that arrives
mid-decode for the next batch; the queue limit and shutting down refuse with EngineBusy."""
import contextlib
import threading

import pytest

from wavllm_fairseq import WavLLM
from wavllm_fairseq.bench.serve_process import presets, tiny_checkpoint, tone_clips
from wavllm_fairseq.data.chat_template import prompt_encoder
from wavllm_fairseq.serve.engine import Decoding, EngineBusy, Job
from wavllm_fairseq.serve.protocol import decode_audio
from wavllm_fairseq.serve.schedulers import BatchEngine, ContinuousEngine

TIMEOUT = 120


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("schedulers")
    api = WavLLM.from_pretrained(tiny_checkpoint(str(tmp), stage=2))
    paths = []
    for i, clip in enumerate(tone_clips(6, seed=5)):
        paths.append(str(tmp / f"clip{i}.wav"))
        with open(paths[-1], "wb") as f:
            f.write(clip)
    return {"api": api, "paths": paths, "audio": [decode_audio(open(p, "rb").read(), "f", 60) for p in paths]}


class Client:
    """One request to an engine: its streamed tokens, its answer, when its first token came."""

    def __init__(self, env, i, max_tokens, decoding=Decoding(), audio=True):
        api = env["api"]
        self.question = presets()[i % len(presets())]
        self.path = env["paths"][i] if audio else None
        enc = prompt_encoder("reference")(api.tokenizer, [(self.question, None)], with_speech=audio,
                                          system=api.task.cfg.system_prompt)
        self.tokens, self.answer, self.done = [], None, threading.Event()
        self.started = threading.Event()
        self.job = Job(enc, env["audio"][i] if audio else None, max_tokens, decoding, on_token=self._token,
                       on_done=self._done)

    def _token(self, t):
        self.tokens.append(t)
        if len(self.tokens) >= 3:
            self.started.set()

    def _done(self, answer):
        self.answer = answer
        self.done.set()

    def alone(self, env):
        return env["api"].generate([self.path], [self.question], max_len_b=self.job.max_tokens,
                                   loop_guard_ngram=0)[0]


@contextlib.contextmanager
def started(scheduler, env, **options):
    engine = scheduler(env["api"], loop_guard_ngram=0, **options)
    try:
        yield engine
    finally:
        engine.close()


def while_decoding(engine, first, *later):
    """Submit ``first``, then, once it has streamed a few tokens, ``later``."""
    engine.submit(first.job)
    assert first.started.wait(TIMEOUT)
    for c in later:
        engine.submit(c.job)


def wait(clients):
    for c in clients:
        assert c.done.wait(TIMEOUT), "no answer"
        assert not isinstance(c.answer, Exception), c.answer


@pytest.mark.parametrize("static", [False, True])
def test_requests_joining_mid_decode_answer_as_alone(env, static):
    with started(ContinuousEngine, env, max_batch=4, static=static) as engine:
        first = Client(env, 0, 80)
        later = [Client(env, 1, 6), Client(env, 2, 12), Client(env, 3, 9, audio=False), Client(env, 4, 20),
                 Client(env, 5, 3)]
        while_decoding(engine, first, *later[:3])  # they join mid-decode
        assert later[0].done.wait(TIMEOUT)  # a row that ended left; two more join the rows still decoding
        for c in later[3:]:
            engine.submit(c.job)
        wait([first] + later)
        for c in [first] + later:
            assert c.answer.text == c.alone(env), c.question
            assert c.tokens == c.answer.tokens and c.answer.finish_reason == "length"  # streamed = answered
        assert first.answer.batch_size >= 3
        stats = engine.stats
        assert stats["joins"] >= 5 and stats["batches"] == 1 and stats["largest_batch"] >= 3
        assert engine.running() == 0 and engine.waiting() == 0


def test_other_settings_wait_for_the_running_batch_and_nobody_overtakes(env):
    with started(ContinuousEngine, env, max_batch=4) as engine:
        greedy = Client(env, 0, 30)
        sampled = Client(env, 1, 5, Decoding(temperature=0.8, seed=7))
        behind = Client(env, 2, 5)  # greedy like the running batch, but it arrived after the sampled one
        while_decoding(engine, greedy, sampled, behind)
        wait([greedy, sampled, behind])
        assert greedy.answer.text == greedy.alone(env) and behind.answer.text == behind.alone(env)
        assert greedy.job.first_token < sampled.job.first_token < behind.job.first_token
        assert sampled.answer.batch_size == 1 and engine.stats["batches"] == 3 and engine.stats["joins"] == 0


def test_a_cancelled_row_ends_and_the_others_answer_as_alone(env):
    with started(ContinuousEngine, env, max_batch=4) as engine:
        leaving, staying = Client(env, 0, 200), Client(env, 1, 25)
        engine.submit(leaving.job)
        engine.submit(staying.job)
        assert leaving.started.wait(TIMEOUT)
        leaving.job.cancelled.set()
        wait([leaving, staying])
        assert leaving.answer.finish_reason == "cancelled" and len(leaving.answer.tokens) < 200
        assert staying.answer.text == staying.alone(env) and engine.stats["cancelled"] == 1


def test_batch_scheduler_keeps_a_late_request_for_the_next_batch(env):
    with started(BatchEngine, env, max_batch=4, max_wait_ms=0) as engine:
        first, late = Client(env, 0, 20), Client(env, 1, 4)
        while_decoding(engine, first, late)
        wait([first, late])
        assert late.job.first_token > first.job.first_token and late.answer.batch_size == 1
        assert engine.stats["batches"] == 2 and engine.stats["joins"] == 0
        assert [c.answer.text for c in (first, late)] == [c.alone(env) for c in (first, late)]


def test_queue_limit_and_shutting_down_refuse(env):
    with started(ContinuousEngine, env, max_batch=1, max_queue=1) as engine:
        running, queued = Client(env, 0, 60), Client(env, 1, 2)
        while_decoding(engine, running, queued)
        with pytest.raises(EngineBusy) as refused:
            engine.submit(Client(env, 2, 2).job)
        assert refused.value.reason == "queue_full" and refused.value.retry_after >= 1
        assert engine.waiting() == 1 and engine.running() == 1
        engine.stop_accepting()
        with pytest.raises(EngineBusy) as refused:
            engine.submit(Client(env, 3, 2).job)
        assert refused.value.reason == "shutting_down"
        wait([running, queued])  # what was taken is still answered
        assert engine.stats["refused"] == 2
