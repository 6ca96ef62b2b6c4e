"""The toy pipeline's report: one table of per-task scores per stage, the stand-in checks, the wall times."""
import json

from wavllm_fairseq.toy.report import format_table, write_report

RESULTS = {"stage1": {"test_asr": {"asr": {"wer": 30.5, "wer_seen": 29.0, "wer_unseen": 32.0, "n": 400}}},
           "stage2": {"test_asr": {"asr": {"wer": 20.25, "wer_seen": 19.5, "wer_unseen": 21.0, "n": 400}},
                      "test_multi": {"multi": {"ifr": 0.95, "accuracy": 0.5}}}}
STANDINS = {"whisper_ctc_wer_valid": 13.8, "wavlm_sv_acc_valid": 0.675, "llama_copy_loss_valid": 0.2,
            "fingerprint": "abc", "settings": {"x": 1}}


def test_table_has_every_stage_target_standin_check_and_time():
    table = format_table(RESULTS, {"stage1": 600.0, "total": 1500.0}, STANDINS)
    lines = table.splitlines()
    assert lines[0] == "| test set | task | metric | stage1 | stage2 | target |"
    asr = next(line for line in lines if line.startswith("| test_asr | asr | wer |"))
    assert "30.50" in asr and "20.25" in asr and "<= 20" in asr
    multi = next(line for line in lines if line.startswith("| test_multi | multi | ifr |"))
    assert multi.split("|")[4].strip() == "" and "0.95" in multi  # no stage-1 value: empty cell
    assert not any("| n |" in line for line in lines)  # counts are not scores
    assert "| Whisper stand-in: CTC greedy WER % (valid_asr) | 13.8 |" in lines
    assert any(line.startswith("| WavLM stand-in: same/different speaker accuracy, own clip head") for line in lines)
    assert not any("fingerprint" in line or "settings" in line for line in lines)
    assert "| total | 25.0 min (1500 s) |" in lines


def test_write_report_keeps_results_and_standin_checks_in_json(tmp_path):
    write_report(str(tmp_path), RESULTS, {"total": 60.0}, STANDINS)
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["results"] == RESULTS and saved["times_s"] == {"total": 60.0}
    assert saved["stage0"] == {"whisper_ctc_wer_valid": 13.8, "wavlm_sv_acc_valid": 0.675, "llama_copy_loss_valid": 0.2}
    assert (tmp_path / "results.md").read_text().count("| test_asr | asr | wer |") == 1
    assert (tmp_path / "scores.png").stat().st_size > 1000


def test_the_references_give_whispers_wer_per_sentence_source_where_there_are_two():
    refs = {"whisper_wer": {"wer": 6.5, "clips": 100, "by_source": {"grammar": {"wer": 8.0, "clips": 60},
                                                                   "open vocabulary": {"wer": 4.25, "clips": 40}}}}
    lines = format_table(RESULTS, {}, refs=refs, recipe="small_real").splitlines()
    i = lines.index("| Whisper tiny.en's own WER % on the test_asr clips (100 clips) | 6.50 |")
    assert lines[i + 1:i + 3] == ["| ... on its grammar clips (60) | 8.00 |",
                                  "| ... on its open vocabulary clips (40) | 4.25 |"]
    one = {"whisper_wer": {"wer": 6.5, "clips": 60, "by_source": {"grammar": {"wer": 6.5, "clips": 60}}}}
    assert not any("... on its" in line for line in format_table(RESULTS, {}, refs=one).splitlines())
