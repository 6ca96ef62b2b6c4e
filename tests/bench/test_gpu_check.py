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
