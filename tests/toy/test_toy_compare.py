"""Runs of the main job side by side: values per run, mean, spread, references and wall times."""
import json

from wavllm_fairseq.toy import compare


def _run(folder, wer, acc, whisper):
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({
        "recipe": "small_real",
        "results": {"stage2": {"test_asr": {"asr": {"wer": wer, "wer_unseen": wer + 1, "n": 10}},
                               "test_sv": {"sv": {"accuracy": acc}}}},
        "references": {"whisper_wer": {"wer": whisper, "clips": 5}},
        "times_s": {"stage1": 600.0, "total": 1200.0}}))
    return str(folder)


def test_each_run_then_mean_and_spread_then_references_and_times(tmp_path, capsys):
    a = _run(tmp_path / "a", 10.0, 0.8, 9.0)
    b = _run(tmp_path / "b", 14.0, 0.9, 9.0)
    assert compare.main([a, b, "--out", str(tmp_path / "t.md")]) == 0
    table = capsys.readouterr().out
    assert "| test_asr | asr | wer | 10.00 | 14.00 | 12.00 | 4.00 | within 3 of Whisper tiny.en alone |" in table
    assert "| test_sv | sv | accuracy | 0.800 | 0.900 | 0.850 | 0.100 | >= 0.9 |" in table
    assert "| n |" not in table and "| Whisper tiny.en alone, WER % on test_asr | 9.00 | 9.00 |" in table
    assert "| wall time: total | 20.0 min | 20.0 min |" in table
    assert (tmp_path / "t.md").read_text().strip() == table.strip()


def test_a_run_without_results_is_named(tmp_path, capsys):
    assert compare.main([str(tmp_path)]) == 2
    assert "results.json: not found" in capsys.readouterr().err
