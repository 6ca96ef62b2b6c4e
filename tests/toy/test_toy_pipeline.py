"""The stand-in recipe end to end, reduced: corpus -> stage 0 -> stage 1 -> stage 2 -> generate -> score.

Runs ``python -m wavllm_fairseq.toy.pipeline --recipe toy --size small`` (the main job's steps on the stand-ins) and
checks what it promises: backbones saved with save_pretrained and loadable through the config paths, a
cached second stage 0, frozen backbones, one score table for every test set and stage, plots, and that
stage 1 beats the untrained model on ASR.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    work = tmp_path_factory.mktemp("toy")
    cmd = [sys.executable, "-m", "wavllm_fairseq.toy.pipeline", "--recipe", "toy", "--size", "small",
           "--work", str(work), "--corpus", str(work / "corpus")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1500,
                         env={**os.environ, "PYTHONHASHSEED": "0"})
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    return dict(work=str(work), log=out.stdout + out.stderr,
                results=json.load(open(work / "results.json")))


def test_stage0_backbones_load_through_the_config_paths_and_are_cached(pipeline):
    from wavllm_fairseq.models import encoders, llm
    from wavllm_fairseq.data.tokenizer import LlamaTokenizer
    from wavllm_fairseq.toy.stage0 import main as stage0

    bb = os.path.join(pipeline["work"], "backbones")
    whisper = encoders.load_whisper_encoder(os.path.join(bb, "whisper"))
    wavlm = encoders.load_wavlm(os.path.join(bb, "wavlm"))
    llama = llm.load_llama(os.path.join(bb, "llama"))
    tok = LlamaTokenizer.from_dir(os.path.join(bb, "llama"))
    assert llama.config.vocab_size == len(tok)
    assert whisper.config.max_source_positions * 2 >= 200 and wavlm.config.num_hidden_layers >= 1
    meta = json.load(open(os.path.join(bb, "stage0.json")))
    assert "whisper_ctc_wer_valid" in meta and "wavlm_style_acc_valid" in meta and "llama_valid_ppl" in meta
    before = os.path.getmtime(os.path.join(bb, "stage0.json"))
    stage0(["--corpus", os.path.join(pipeline["work"], "corpus"), "--out", bb, "--size", "small"])
    assert os.path.getmtime(os.path.join(bb, "stage0.json")) == before  # cached: nothing retrained


def test_every_test_set_is_scored_for_both_stages_with_plots(pipeline):
    res = pipeline["results"]["results"]
    assert set(res) >= {"stage1", "stage2", "untrained"}
    for task in ("asr", "st", "sv", "er", "gender", "sqa", "it", "multi"):
        for stage in ("stage1", "stage2"):
            assert f"test_{task}" in res[stage], (stage, task)
    assert "wer_unseen" in res["stage2"]["test_asr"]["asr"] and "ifr" in res["stage2"]["test_multi"]["multi"]
    for png in ("loss_curves.png", "scores.png", "prompt_tsne.png"):
        assert os.path.getsize(os.path.join(pipeline["work"], png)) > 1000
    assert "| test set |" in pipeline["log"] and "wall time" in pipeline["log"]
    assert "[stage0]" in pipeline["log"] and "[corpus]" in pipeline["log"]


def test_each_stage_gets_an_error_breakdown_over_every_test_row(pipeline):
    from wavllm_fairseq.data.manifest import read_manifest

    corpus = os.path.join(pipeline["work"], "corpus")
    for stage in ("stage1", "stage2"):
        counts = json.load(open(os.path.join(pipeline["work"], "decode", stage, "breakdown.json")))
        for name, per_pool in counts["single"].items():
            rows, _ = read_manifest(os.path.join(corpus, name + ".tsv"))
            assert sum(c["rows"] for c in per_pool.values()) == len(rows), (stage, name)
            for c in per_pool.values():
                assert c["right"] + c["asked task, wrong"] + c["another task"] + c["neither"] == c["rows"]
        multi, _ = read_manifest(os.path.join(corpus, "test_multi.tsv"))
        assert sum(n for v in counts["multi"].values() for _, n in v.values()) == len(multi)
    assert "Where the stage-2 answers go" in open(os.path.join(pipeline["work"], "results.md")).read()


def test_stage1_beats_the_untrained_model_on_asr(pipeline):
    res = pipeline["results"]["results"]
    untrained = res["untrained"]["test_asr"]["asr"]["wer"]
    stage1 = res["stage1"]["test_asr"]["asr"]["wer"]
    assert stage1 < untrained - 10, (stage1, untrained)


def test_checkpoints_hold_only_trained_parts_and_backbones_reload_from_their_dirs(pipeline):
    import torch

    for stage in ("stage1", "stage2"):
        ckpt = torch.load(os.path.join(pipeline["work"], stage, "checkpoint_last.pt"), map_location="cpu",
                          weights_only=False)
        keys = list(ckpt["model"])
        frozen = [k for k in keys
                  if k.startswith(("whisper.", "wavlm.")) or (k.startswith("llm.") and "lora_" not in k)]
        assert not frozen, (stage, frozen[:5])
        assert any(".lora_B." in k for k in keys) and any(k.startswith("projector.") for k in keys)
        assert any(k.startswith("prompt_scale.") for k in keys) == (stage == "stage2")
        assert ckpt["cfg"]["model"]["llama_path"].endswith(os.path.join("backbones", "llama"))
