"""The toy pipeline's command line: what reaches which step (no training: the steps are stubbed)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_seed_and_overrides_reach_both_training_stages_only(tmp_path, monkeypatch):
    from wavllm_fairseq.toy import corpus, pipeline, stage0

    seen = {}
    monkeypatch.setattr(corpus, "main", lambda argv: seen.setdefault("corpus", argv) and 0)
    monkeypatch.setattr(stage0, "pretrain", lambda corpus, out, size, seed: seen.setdefault("stage0_seed", seed) and {})

    class Stop(Exception):
        pass

    def train_stage(stage, corpus, backbones, out, updates, init, extra, echo=True):
        seen[f"stage{stage}"] = extra
        if stage == 2:
            raise Stop  # decoding and scoring need real checkpoints; the overrides are what is checked
        return "ckpt1"

    monkeypatch.setattr(pipeline, "train_stage", train_stage)
    with pytest.raises(Stop):
        pipeline.main(["--work", str(tmp_path), "--seed", "1", "--train-seed", "2",
                       "--override", "task.prompt_augment=true", "--override", "optimization.lr=[1e-4]"])
    assert seen["corpus"][seen["corpus"].index("--seed") + 1] == "1" and seen["stage0_seed"] == 1
    for stage in (1, 2):
        assert seen[f"stage{stage}"] == ["common.seed=2", "task.prompt_augment=true", "optimization.lr=[1e-4]"]


def test_a_malformed_override_is_refused_before_any_work(tmp_path):
    out = subprocess.run([sys.executable, "-m", "wavllm_fairseq.toy.pipeline", "--work", str(tmp_path / "w"),
                          "--override", "task.prompt_augment"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "KEY=VALUE" in out.stderr
    assert not (tmp_path / "w").exists()
