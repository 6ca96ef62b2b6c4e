"""The server the endpoint tests (test_serve.py, test_serve_input.py) share: one per session, on a tiny random
stage-2 checkpoint (per-row prompt-aware LoRA scale), and the Python API on the same checkpoint."""
import pytest

from serve_helpers import MAX_AUDIO_S, MAX_BODY_MB
from wavllm_fairseq.bench.serve_process import ServerProcess, tiny_checkpoint, tone_clips


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    ckpt = tiny_checkpoint(str(tmp), stage=2)
    clips = tone_clips(8, seed=3)
    paths = []
    for i, c in enumerate(clips):
        paths.append(str(tmp / f"clip{i}.wav"))
        with open(paths[-1], "wb") as f:
            f.write(c)
    # no loop guard: the random model's answers run to max_tokens (the Python API is called the same way)
    with ServerProcess(ckpt, "--max-batch", "8", "--max-wait-ms", "150", "--threads", "1", "--loop-guard-ngram", "0",
                       "--max-audio-seconds", str(MAX_AUDIO_S), "--max-body-mb", str(MAX_BODY_MB),
                       "--default-max-tokens", "12", log_path=str(tmp / "server.log")) as srv:
        yield {"url": srv.url, "ckpt": ckpt, "clips": clips, "paths": paths, "tmp": tmp, "srv": srv}


class _API:
    """The Python API on the server's checkpoint, decoding as the test server does (no loop guard)."""

    def __init__(self, ckpt):
        from wavllm_fairseq import WavLLM

        self.m = WavLLM.from_pretrained(ckpt)
        self.model = self.m.model

    def generate(self, audios, prompts, **kw):
        return self.m.generate(audios, prompts, loop_guard_ngram=0, **kw)


@pytest.fixture(scope="session")
def api(env):
    return _API(env["ckpt"])
