"""The GPU check script runs end to end (on the CPU, tiny sizes) and writes its table and results."""
import json
import os

from wavllm_fairseq.bench import gpu_check


def test_gpu_check_sections_run_and_report(tmp_path):
    out = tmp_path / "out"
    rc = gpu_check.main(["--device", "cpu", "--arch", "wavllm_tiny", "--vocab", "100", "--seconds", "1",
                         "--memory-batches", "1", "--decode-batches", "2", "--new-tokens", "4",
                         "--no-hf-static", "--decoders", "static", "compiled", "--only", "memory", "decode",
                         "invariance", "--out", str(out)])
    assert rc == 0
    report = json.load(open(out / "results.json"))
    assert "errors" not in report, report.get("errors")
    assert {(r["stage"], r["batch"], r["ckpt"]) for r in report["memory"]} == {
        (s, 1, c) for s in (1, 2) for c in (False, True)}
    [decode] = report["decode"]["results"]
    assert decode["batch"] == 2 and set(decode["tokens_per_s"]) == {"ours static", "ours static compiled",
                                                                     "hf generate"}
    assert decode["identical_to_hf_generate"] == {"ours static": True, "ours static compiled": True}
    assert set(decode["first_call_s"]) == set(decode["tokens_per_s"])  # capture / compilation cost, reported
    assert set(report["invariance"]) == {"bfloat16", "float32"}
    assert report["invariance"]["float32"]["rows_differing"] == 0
    table = open(out / "table.md").read()
    assert "| stage | batch | no checkpointing | activation checkpointing |" in table
    assert "First call at batch 2" in table and "ours static compiled" in table
    assert "rows differing" in table and os.path.isfile(out / "decode.json")


def test_gpu_check_refuses_to_run_without_a_gpu(capsys):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert gpu_check.main(["--out", "unused"]) == 2
    assert "needs a GPU" in capsys.readouterr().err


def test_gpu_check_refuses_a_config_dir_without_the_toy_yamls(tmp_path, capsys):
    rc = gpu_check.main(["--device", "cpu", "--only", "cli", "--config-dir", str(tmp_path), "--out",
                         str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"--config-dir {tmp_path} has no toy_stage1.yaml / toy_stage2.yaml" in err
    assert not gpu_check.missing_configs(gpu_check.TOY_CONFIGS)  # the default: the package's toy yamls


def test_tiny_corpus_is_an_instruction_corpus_with_its_tokenizer_and_llama(tmp_path):
    from transformers import AutoConfig

    from wavllm_fairseq.bench.tiny_corpus import write_tiny_corpus
    from wavllm_fairseq.data.manifest import read_manifest
    from wavllm_fairseq.data.tokenizer import LlamaTokenizer
    from wavllm_fairseq.models.architectures import ARCHITECTURES

    paths = write_tiny_corpus(str(tmp_path), n_train=3, n_test=2)
    counts = {}
    for name in ("train_asr", "train_it", "valid_asr", "test_asr", "test_it"):
        rows = read_manifest(paths[name], check_audio=True)[0]
        counts[name] = (len(rows), sum(r.with_speech for r in rows))
        assert all(r.tgt_text for r in rows)
    assert counts == {"train_asr": (3, 3), "train_it": (3, 0), "valid_asr": (2, 2), "test_asr": (2, 2),
                      "test_it": (2, 0)}
    tok = LlamaTokenizer.from_dir(paths["tok"])
    cfg = AutoConfig.from_pretrained(paths["llama"])
    assert cfg.vocab_size == len(tok) and (tok.bos_id, tok.eos_id) == (1, 2)
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (ARCHITECTURES["wavllm_tiny"]["llama_dim"],
                                                        ARCHITECTURES["wavllm_tiny"]["llama_layers"])
