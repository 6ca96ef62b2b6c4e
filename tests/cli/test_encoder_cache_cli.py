"""The encoder cache through the real CLIs: wavllm-cache-encoders, fairseq-hydra-train, fairseq-generate."""
import json
import os
import re
import subprocess

import pytest
import torch

from helpers import make_corpus
from test_train_cli import ENV, ROOT, TOY_CONFIGS, USER_DIR, frozen_and_trainable, tiny_overrides, train

pytestmark = pytest.mark.slow


def records(cache_dir):
    """Record lines in every index of the cache folder (one fingerprint folder expected)."""
    folders = [os.path.join(cache_dir, d) for d in os.listdir(cache_dir)]
    assert len(folders) == 1, folders
    return sum(sum(1 for _ in open(os.path.join(folders[0], n))) for n in os.listdir(folders[0])
               if n.startswith("index-"))


def unique_keys(cache_dir):
    folder = os.path.join(cache_dir, os.listdir(cache_dir)[0])
    return {json.loads(line)["key"] for n in os.listdir(folder) if n.startswith("index-")
            for line in open(os.path.join(folder, n))}


def generate(corpus, ckpt, extra=()):
    cmd = ["fairseq-generate", os.path.dirname(corpus["train_asr"]), "--user-dir", USER_DIR, "--task",
           "wavllm_instruction", "--tokenizer-dir", corpus["tok"], "--gen-subset", "test_asr", "--path", ckpt,
           "--batch-size", "3", "--beam", "1", "--max-len-b", "12", "--cpu", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return dict(re.findall(r"^D-(\d+)\t[^\t]*\t(.*)$", out.stdout + out.stderr, re.M))


def test_training_and_decoding_through_a_float32_cache_equal_live_encoders(tmp_path):
    corpus = make_corpus(str(tmp_path / "corpus"), n_train=4)
    cache = str(tmp_path / "cache")
    cache_opts = [f"task.encoder_cache={cache}", "task.encoder_cache_dtype=float32"]
    # the command fills the cache from the stage yaml and the same overrides training gets
    base = tiny_overrides(corpus, tmp_path / "unused", 6)
    fill = subprocess.run(["wavllm-cache-encoders", "--config-dir", TOY_CONFIGS, "--config-name", "toy_stage1",
                           *[o for o in base if o.startswith(("task.", "model.", "common.seed"))], *cache_opts],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert fill.returncode == 0, (fill.stdout + fill.stderr)[-3000:]
    n_clips = 4 + 4 + 4  # train_asr, valid_asr, test_asr (the IT manifests have no audio)
    assert f"cached {n_clips} new clips" in fill.stdout and records(cache) == n_clips
    # a second run finds every clip
    again = subprocess.run(["wavllm-cache-encoders", "--config-dir", TOY_CONFIGS, "--config-name", "toy_stage1",
                            *[o for o in base if o.startswith(("task.", "model.", "common.seed"))], *cache_opts],
                           capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert again.returncode == 0 and "cached 0 new clips" in again.stdout, again.stdout[-2000:]

    def trained(name, extra=()):
        train(1, tiny_overrides(corpus, tmp_path / name, 6, list(extra)), tmp_path / f"{name}.log")
        state = torch.load(os.path.join(tmp_path / name, "checkpoint_last.pt"), map_location="cpu",
                           weights_only=False)["model"]
        return frozen_and_trainable(state)[1]

    live = trained("live")
    # a cache filled by the training run itself (each clip stored from the batch that first needs it), then
    # read back by a second run with the same batches: the live numbers exactly
    fresh = [f"task.encoder_cache={tmp_path / 'fresh'}", "task.encoder_cache_dtype=float32"]
    written = []
    for name in ("fill", "read"):
        got = trained(name, fresh)
        assert got.keys() == live.keys()
        for k in live:
            assert torch.equal(got[k], live[k]), (name, k)
        written.append(records(str(tmp_path / "fresh")))
    # each clip the run met (some of train_asr, all of valid_asr) stored once; the second run wrote nothing
    assert written[0] == written[1] == len(unique_keys(str(tmp_path / "fresh"))) >= 4 + 1
    # the command's cache (clips batched by length, not as training batches them): equal up to float
    # rounding of the encoders on other batch shapes
    prefilled = trained("prefilled", cache_opts)
    assert records(cache) == n_clips
    for k in live:
        assert torch.allclose(prefilled[k], live[k], rtol=1e-4, atol=1e-5), k
    cached_dir = tmp_path / "prefilled"

    ckpt = os.path.join(cached_dir, "checkpoint_last.pt")
    assert generate(corpus, ckpt, ["--encoder-cache", cache, "--encoder-cache-dtype", "float32"]) == \
        generate(corpus, ckpt)


def test_the_command_names_what_is_missing(tmp_path):
    out = subprocess.run(["wavllm-cache-encoders", "model._name=wavllm_tiny"], capture_output=True, text=True,
                         cwd=ROOT, env=ENV, timeout=120)
    assert out.returncode == 2 and "task.encoder_cache" in out.stderr
    out = subprocess.run(["wavllm-cache-encoders", f"task.encoder_cache={tmp_path}", "model._name=nope"],
                         capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)
    assert out.returncode == 2 and "not an architecture" in out.stderr
