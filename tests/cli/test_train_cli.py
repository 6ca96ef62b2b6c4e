"""The real CLIs on a tiny model: fairseq-hydra-train stage 1 -> stage 2, fairseq-generate, the Python API."""
import json
import os
import re
import subprocess

import pytest
import torch

from helpers import make_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY_CONFIGS = os.path.join(ROOT, "wavllm_fairseq", "toy", "config", "toy")
USER_DIR = os.path.join(ROOT, "wavllm_fairseq")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}

pytestmark = pytest.mark.slow


def tiny_overrides(corpus, save_dir, updates, extra=()):
    return [f"common.user_dir={USER_DIR}", f"task.data={os.path.dirname(corpus['train_asr'])}",
            f"task.tokenizer_dir={corpus['tok']}", f"checkpoint.save_dir={save_dir}", "model._name=wavllm_tiny",
            "model.whisper_path=", "model.wavlm_path=", f"model.llama_path={corpus['llama']}", "model.lora_rank=4",
            "model.lora_alpha=8.0", "model.lora_dropout=0.0", "task.train_manifests='train_asr,train_it'",
            "task.train_weights='1,1'", "task.updates_per_epoch=10", f"optimization.max_update={updates}",
            "optimization.lr=[1e-2]", "lr_scheduler.warmup_updates=2", "dataset.batch_size=4",
            "dataset.max_tokens=160000", "dataset.valid_subset=valid_asr", "dataset.validate_interval_updates=6",
            "checkpoint.save_interval_updates=6", "checkpoint.keep_interval_updates=2", "common.log_interval=1",
            "common.seed=3", "task.max_audio_seconds=5", *extra]


def train(stage, overrides, log_path):
    cmd = ["fairseq-hydra-train", "--config-dir", TOY_CONFIGS, "--config-name", f"toy_stage{stage}", *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    with open(log_path, "w") as f:
        f.write(out.stdout + out.stderr)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out.stdout + out.stderr


def train_losses(log: str):
    """(num_updates, loss) of fairseq's json ``train_inner`` records, in order."""
    losses = []
    for line in log.splitlines():
        if "{" not in line:
            continue
        try:
            rec = json.loads(line[line.index("{"):])
        except ValueError:
            continue
        if isinstance(rec, dict) and "loss" in rec and "num_updates" in rec:
            losses.append((int(rec["num_updates"]), float(rec["loss"])))
    return losses


def frozen_and_trainable(state):
    frozen = {k: v for k, v in state.items() if k.startswith(("whisper.", "wavlm.")) or
              (k.startswith("llm.") and "lora_" not in k)}
    trainable = {k: v for k, v in state.items() if k not in frozen}
    return frozen, trainable


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("train")
    corpus = make_corpus(str(work / "corpus"), n_train=4)
    s1 = work / "stage1"
    log1 = train(1, tiny_overrides(corpus, s1, 24), work / "stage1.log")
    s2 = work / "stage2"
    log2 = train(2, tiny_overrides(corpus, s2, 6, [f"checkpoint.finetune_from_model={s1}/checkpoint_last.pt",
                                                   "task.train_manifests='train_asr,train_it'"]), work / "stage2.log")
    return dict(corpus=corpus, s1=str(s1), s2=str(s2), log1=log1, log2=log2, work=str(work))


def test_stage1_loss_is_finite_and_decreases_on_a_small_repeated_corpus(runs):
    losses = train_losses(runs["log1"])
    assert len(losses) >= 15, runs["log1"][-2000:]
    values = [v for _, v in losses]
    assert all(v == v and v < 1e4 for v in values)
    first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
    assert last < first - 1.0, " ".join(map(str, values))
    assert "trainable" in runs["log1"]


def test_frozen_weights_bit_identical_and_trainable_ones_move(runs):
    ckpts = sorted(f for f in os.listdir(runs["s1"]) if re.match(r"checkpoint_\d+_\d+\.pt", f))
    assert len(ckpts) >= 2, os.listdir(runs["s1"])
    load = lambda p: torch.load(p, map_location="cpu", weights_only=False)["model"]  # noqa: E731
    a = load(os.path.join(runs["s1"], ckpts[0]))
    b = load(os.path.join(runs["s1"], "checkpoint_last.pt"))
    c = load(os.path.join(runs["s2"], "checkpoint_last.pt"))
    fa, ta = frozen_and_trainable(a)
    fb, tb = frozen_and_trainable(b)
    fc, tc = frozen_and_trainable(c)
    assert fa and set(fa) == set(fb) == set(fc)
    for k in fa:
        assert torch.equal(fa[k], fb[k]) and torch.equal(fa[k], fc[k]), k
    moved = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert any("lora_B" in k for k in moved) and any("projector" in k for k in moved)
    assert any(k.startswith("prompt_scale.") for k in tc) and not any(k.startswith("prompt_scale.") for k in tb)


def test_stage2_starts_from_stage1_with_a_fresh_prompt_adapter(runs):
    assert "prompt_scale" in runs["log2"] and "initialised fresh" in runs["log2"]
    losses = [v for _, v in train_losses(runs["log2"])]
    assert losses and all(v == v for v in losses)
    # stage 2 starts where stage 1 ended, not from scratch
    s1_last = [v for _, v in train_losses(runs["log1"])][-3:]
    assert losses[0] < 2 * max(s1_last) + 1.0


def generate(runs, ckpt, subset, extra=()):
    cmd = ["fairseq-generate", os.path.dirname(runs["corpus"]["train_asr"]), "--user-dir", USER_DIR,
           "--task", "wavllm_instruction", "--tokenizer-dir", runs["corpus"]["tok"], "--gen-subset", subset,
           "--path", ckpt, "--batch-size", "3", "--max-len-b", "12", "--scoring", "wer", "--cpu", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out.stdout + out.stderr


@pytest.mark.parametrize("stage", [1, 2])
def test_fairseq_generate_prints_a_hypothesis_per_item_and_wer(runs, stage):
    ckpt = os.path.join(runs[f"s{stage}"], "checkpoint_last.pt")
    out = generate(runs, ckpt, "test_asr")
    ids = sorted(int(m) for m in re.findall(r"^H-(\d+)\t", out, re.M))
    assert ids == [0, 1, 2, 3], out[-2000:]
    assert len(re.findall(r"^T-\d+\t", out, re.M)) == 4 and len(re.findall(r"^D-\d+\t", out, re.M)) == 4
    assert re.search(r"Generate test_asr with beam=5: WER: [\d.]+", out), out[-1500:]
    out_beam = generate(runs, ckpt, "test_it", ["--beam", "3"])
    assert len(re.findall(r"^H-\d+\t", out_beam, re.M)) == 4
    if stage == 2:  # the static path with a compiled layer step (a GPU's choice) gives the same hypotheses
        def hyps(text):  # id -> (score, detokenized hypothesis)
            return {int(i): (float(sc), h) for i, sc, h in re.findall(r"^D-(\d+)\t([^\t]*)\t(.*)$", text, re.M)}

        dyn = hyps(out)
        static = hyps(generate(runs, ckpt, "test_asr", ["--decode-path", "static", "--compile-decode-step"]))
        assert {i: h for i, (_, h) in static.items()} == {i: h for i, (_, h) in dyn.items()}
        assert all(abs(static[i][0] - dyn[i][0]) < 1e-4 for i in dyn)  # scores up to float rounding


def test_decode_reference_yaml_samples_reproducibly_with_a_seed(runs):
    """examples/wavllm/config/decode_reference.yaml (the reference's sampling at 0.5, batch 1, no loop guard, its
    length rule) gives working fairseq-generate flags; the same --seed gives the same answers."""
    from wavllm_fairseq.tools.decode_args import decode_args, load

    flags = decode_args(load(os.path.join(ROOT, "examples", "wavllm", "config", "decode_reference.yaml")))
    ckpt = os.path.join(runs["s2"], "checkpoint_last.pt")

    def answers(seed):
        cmd = ["fairseq-generate", os.path.dirname(runs["corpus"]["train_asr"]), *flags, "--tokenizer-dir",
               runs["corpus"]["tok"], "--gen-subset", "test_asr", "--path", ckpt, "--max-len-b", "40", "--cpu",
               "--seed", str(seed)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
        return dict(re.findall(r"^D-(\d+)\t[^\t]*\t(.*)$", out.stdout + out.stderr, re.M))

    first = answers(5)
    assert sorted(map(int, first)) == [0, 1, 2, 3]
    assert answers(5) == first


def test_python_api_matches_fairseq_generate(runs):
    from wavllm_fairseq import WavLLM
    from wavllm_fairseq.data.manifest import read_manifest

    ckpt = os.path.join(runs["s2"], "checkpoint_last.pt")
    out = generate(runs, ckpt, "test_asr", ["--beam", "1"])
    cli = {int(i): t for i, t in re.findall(r"^D-(\d+)\t[^\t]*\t(.*)$", out, re.M)}
    m = WavLLM.from_pretrained(ckpt, tokenizer_dir=runs["corpus"]["tok"], trust_checkpoint=False)
    rows, _ = read_manifest(runs["corpus"]["test_asr"])
    root = os.path.dirname(runs["corpus"]["test_asr"])
    answers = m.generate([os.path.join(root, r.audio) for r in rows], [r.prompt for r in rows], max_len_b=12,
                         batch_size=2)
    assert [a.strip() for a in answers] == [cli[i].strip() for i in range(len(rows))]
