"""The toy pipeline's command line: what reaches which step (no training: the steps are stubbed)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_train_seed_and_overrides_reach_both_training_stages_only(tmp_path, monkeypatch):
    from wavllm_fairseq.toy import corpus, pipeline, stage0

    seen = {}
    monkeypatch.setattr(corpus, "main", lambda argv: seen.setdefault("corpus", argv) and 0)
    monkeypatch.setattr(stage0, "pretrain",
                        lambda corpus, out, size, seed, only: seen.setdefault("stage0_seed", seed) and {})

    class Stop(Exception):
        pass

    def train_stage(stage, corpus, recipe, out, updates, init, extra, echo=True, warmup=None):
        seen[f"stage{stage}"] = extra
        seen[f"stage{stage}_budget"] = (updates, warmup)
        if stage == 2:
            raise Stop  # decoding and scoring need real checkpoints; the overrides are what is checked
        return "ckpt1"

    monkeypatch.setattr(pipeline, "train_stage", train_stage)
    with pytest.raises(Stop):
        pipeline.main(["--recipe", "toy", "--work", str(tmp_path), "--seed", "1", "--train-seed", "2",
                       "--override", "task.prompt_augment=true", "--override", "optimization.lr=[1e-4]"])
    assert seen["corpus"][seen["corpus"].index("--seed") + 1] == "1" and seen["stage0_seed"] == 1
    for stage in (1, 2):
        assert seen[f"stage{stage}"] == ["common.seed=2", "task.prompt_augment=true", "optimization.lr=[1e-4]"]
        assert seen[f"stage{stage}_budget"] == (None, None)  # the toy configs' own updates and warm-up


def test_stage_updates_set_that_stage_and_a_tenth_of_it_as_warm_up(tmp_path, monkeypatch):
    from wavllm_fairseq.toy import corpus, pipeline, stage0, steps

    monkeypatch.setattr(corpus, "main", lambda argv: 0)
    monkeypatch.setattr(stage0, "pretrain", lambda corpus, out, size, seed, only: {})
    calls, cmds = {}, []

    class Stop(Exception):
        pass

    def train_stage(stage, corpus, recipe, out, updates, init, extra, echo=True, warmup=None):
        calls[stage] = (updates, warmup)
        if stage == 2:
            raise Stop
        return "ckpt1"

    real_train_stage = pipeline.train_stage
    monkeypatch.setattr(pipeline, "train_stage", train_stage)
    with pytest.raises(Stop):
        pipeline.main(["--recipe", "toy", "--work", str(tmp_path), "--stage2-updates", "1000"])
    assert calls == {1: (None, None), 2: (1000, 100)}
    with pytest.raises(Stop):
        pipeline.main(["--recipe", "toy", "--work", str(tmp_path), "--size", "small", "--stage1-updates", "5"])
    assert calls == {1: (5, 1), 2: (pipeline.SIZES["small"]["stage2_updates"], None)}
    # the numbers reach fairseq-hydra-train's command line, before the user's overrides (which win)
    monkeypatch.setattr(steps, "run", lambda cmd, log_path, env=None, echo=True: cmds.append(cmd))
    (tmp_path / "s2").mkdir()
    (tmp_path / "s2" / "checkpoint_last.pt").write_bytes(b"")
    recipe = pipeline.Recipe("toy", {k: f"B/{k}" for k in ("whisper", "wavlm", "llama")})
    real_train_stage(2, "C", recipe, str(tmp_path / "s2"), 1000, "init.pt", ["lr_scheduler.warmup_updates=7"],
                     warmup=100)
    cmd = cmds[-1]
    assert cmd[0] == "fairseq-hydra-train" and "optimization.max_update=1000" in cmd
    assert cmd.index("lr_scheduler.warmup_updates=100") < cmd.index("lr_scheduler.warmup_updates=7")
    real_train_stage(1, "C", recipe, str(tmp_path / "s2"), None, None, [])
    assert not any(c.startswith(("optimization.max_update=", "lr_scheduler.warmup_updates=")) for c in cmds[-1])


def test_a_non_positive_stage_budget_is_refused(tmp_path):
    from wavllm_fairseq.toy import pipeline

    with pytest.raises(SystemExit) as e:
        pipeline.main(["--work", str(tmp_path / "w"), "--stage2-updates", "0"])
    assert e.value.code == 2 and not (tmp_path / "w").exists()


def test_a_malformed_override_is_refused_before_any_work(tmp_path):
    out = subprocess.run([sys.executable, "-m", "wavllm_fairseq.toy.pipeline", "--work", str(tmp_path / "w"),
                          "--override", "task.prompt_augment"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "KEY=VALUE" in out.stderr
    assert not (tmp_path / "w").exists()


def test_small_real_recipe_trains_its_configs_on_the_prepared_folders(tmp_path, monkeypatch):
    from wavllm_fairseq.tools import small_backbones
    from wavllm_fairseq.toy import corpus, pipeline, references, stage0

    seen = {}
    monkeypatch.setattr(corpus, "main", lambda argv: seen.setdefault("corpus", argv) and 0)
    monkeypatch.setattr(stage0, "pretrain", lambda corpus, out, size, seed, only: seen.setdefault("only", only) and {})
    monkeypatch.setattr(small_backbones, "require_packages", lambda: None)
    prepared = (str(tmp_path / "real" / "whisper-tiny.en"), str(tmp_path / "real" / "smollm2"))
    monkeypatch.setattr(small_backbones, "prepare", lambda out: prepared)
    # what the backbones do alone: Whisper on the corpus's own test_asr clips, SmolLM2 on the questions as text
    monkeypatch.setattr(references, "whisper_ceiling",
                        lambda whisper, manifest: seen.setdefault("ceiling", (whisper, manifest)) and
                        {"wer": 5.0, "clips": 3})
    monkeypatch.setattr(pipeline, "_fill_encoder_cache",
                        lambda corpus, recipe, seed, log_path: seen.setdefault("cache", recipe.encoder_cache))
    # SQQA trains on SmolLM2's own answers: the pipeline writes train_sqqa_llm.tsv, which the yamls read
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "train_sqqa.tsv").write_text("id\taudio\n")
    monkeypatch.setattr(references, "self_answer_manifest",
                        lambda llm, src, out, system: seen.setdefault("self_answers", (llm, src, out, system))
                        and {"questions": 1, "out": out})

    class Stop(Exception):
        pass

    def train_stage(stage, corpus, recipe, out, updates, init, extra, echo=True, warmup=None):
        seen["recipe"] = recipe
        raise Stop

    monkeypatch.setattr(pipeline, "train_stage", train_stage)
    with pytest.raises(Stop):
        pipeline.main(["--work", str(tmp_path), "--corpus", str(tmp_path / "corpus")])  # small_real: the default
    recipe = seen["recipe"]
    assert os.path.basename(recipe.config_dir) == "small_real" and recipe.config_name(1) == "small_real_stage1"
    assert os.path.isfile(os.path.join(recipe.config_dir, recipe.config_name(2) + ".yaml"))
    assert recipe.backbones == {"whisper": prepared[0], "llama": prepared[1],
                                "wavlm": os.path.join(str(tmp_path), "backbones", "wavlm")}
    # SmolLM2 was trained with its own chat template; decoding gives it the system prompt the yamls train with
    assert recipe.decode_args == ["--chat-template", "tokenizer", "--system-prompt", pipeline.REAL_SYSTEM_PROMPT,
                                  "--encoder-cache", os.path.join(str(tmp_path), "encoder_cache")]
    assert seen["corpus"][seen["corpus"].index("--voices") + 1] == "flite"
    assert seen["only"] == ("wavlm",)  # the real Whisper and SmolLM2 need no stand-ins
    assert seen["ceiling"] == (prepared[0], str(tmp_path / "corpus" / "test_asr.tsv"))
    assert seen["cache"] == os.path.join(str(tmp_path), "encoder_cache")
    assert any(o.startswith("task.encoder_cache=") for o in recipe.overrides())
    corpus_dir = tmp_path / "corpus"
    assert seen["self_answers"] == (prepared[1], str(corpus_dir / "train_sqqa.tsv"),
                                    str(corpus_dir / "train_sqqa_llm.tsv"), pipeline.REAL_SYSTEM_PROMPT)
    for stage in (1, 2):
        with open(os.path.join(recipe.config_dir, recipe.config_name(stage) + ".yaml")) as f:
            manifests = next(line for line in f if line.strip().startswith("train_manifests:")).split(":")[1]
        assert "train_sqqa_llm" in manifests.split(",") and "train_sqqa" not in manifests.strip().split(",")


@pytest.mark.parametrize("flag", ["on", "off"])
def test_small_real_aligns_first_and_stage1_starts_from_the_alignment(tmp_path, monkeypatch, flag):
    from wavllm_fairseq.tools import small_backbones
    from wavllm_fairseq.toy import corpus, pipeline, references, stage0

    monkeypatch.setattr(corpus, "main", lambda argv: 0)
    monkeypatch.setattr(stage0, "pretrain", lambda corpus, out, size, seed, only: {})
    monkeypatch.setattr(small_backbones, "require_packages", lambda: None)
    monkeypatch.setattr(small_backbones, "prepare", lambda out: ("W", "L"))
    monkeypatch.setattr(references, "whisper_ceiling", lambda whisper, manifest: {"wer": 5.0, "clips": 3})
    monkeypatch.setattr(pipeline, "_fill_encoder_cache", lambda corpus, recipe, seed, log_path: None)
    calls = []

    class Stop(Exception):
        pass

    def train_stage(stage, corpus, recipe, out, updates, init, extra, echo=True, warmup=None):
        calls.append((stage, recipe.config_name(stage), os.path.basename(out), updates, warmup, init))
        if stage == 2:
            raise Stop
        return f"{out}/checkpoint_last.pt"

    monkeypatch.setattr(pipeline, "train_stage", train_stage)
    with pytest.raises(Stop):
        pipeline.main(["--work", str(tmp_path), "--corpus", str(tmp_path / "corpus"), "--align", flag,
                       "--align-updates", "40"])
    if flag == "on":
        assert calls[0] == ("align", "small_real_align", "align", 40, 4, None)
        assert calls[1][:3] == (1, "small_real_stage1", "stage1")
        assert calls[1][5] == os.path.join(str(tmp_path), "align", "checkpoint_last.pt")
    else:
        assert [c[0] for c in calls] == [1, 2] and calls[0][5] is None
    assert os.path.isfile(os.path.join(pipeline.Recipe("small_real", {}).config_dir, "small_real_align.yaml"))
    assert not pipeline.Recipe("toy", {}).has_align  # the toy recipe has no stage 1a


def test_decode_stages_are_checked():
    from wavllm_fairseq.toy import pipeline

    with pytest.raises(SystemExit):
        pipeline.main(["--decode-stages", "3"])
