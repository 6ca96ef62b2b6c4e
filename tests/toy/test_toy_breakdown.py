"""The toy error breakdown on hand-made test sets and hypotheses: every count below is by hand."""
import json
import os
import subprocess
import sys

import pytest

from helpers import write_manifest
from wavllm_fairseq.evaluation.metrics import word_errors
from wavllm_fairseq.data.text_norm import words
from wavllm_fairseq.toy.breakdown import breakdown, format_breakdown, nearest_task

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXTRA = ["label", "prompt_pool", "subtasks", "sub_markers", "sub_targets"]


def row(i, tgt, task, pool, **extra):
    return {"id": f"{task}{i}", "audio": "a.wav", "n_frames": "16000", "prompt": "p", "tgt_text": tgt,
            "with_speech": "True", "task": task, "prompt_pool": pool, **extra}


def generated(hyps):
    return "".join(f"D-{i}\t-0.5\t{h}\n" for i, h in enumerate(hyps))


@pytest.fixture
def toy(tmp_path):
    corpus, decode = tmp_path / "corpus", tmp_path / "decode"
    corpus.mkdir()
    decode.mkdir()
    sets = {
        "test_asr": [(row(0, "a blue dog pulls the apple", "asr", "seen"), "a blue dog pulls the apple"),  # right
                     (row(1, "a red cat finds the tree", "asr", "seen"),
                      "a red cat finds the tree at home"),  # right (1/6)
                     (row(2, "the boy likes the ball", "asr", "unseen"), "The speaker is male."),  # gender
                     (row(3, "the girl sees the cake", "asr", "unseen"),
                      "a big cow likes the ball"),  # asr, wrong (2/6 from row 4)
                     (row(4, "a big cow finds the box", "asr", "unseen"), "b-b-b-b")],  # neither
        "test_er": [(row(0, "The speaker sounds sad.", "er", "seen", label="sad"), "The speaker sounds sad."),
                    (row(1, "The speaker sounds happy.", "er", "seen", label="happy"), "The speaker sounds angry."),
                    (row(2, "The speaker sounds angry.", "er", "unseen", label="angry"), "a red cat finds the tree")],
        "test_gender": [(row(0, "The speaker is male.", "gender", "seen", label="male"), "The speaker is female."),
                        (row(1, "The speaker is female.", "gender", "unseen", label="female"),
                         "The speaker is female.")],
        "test_multi": [(row(0, "The transcription is: a b The answer to the text question is: c", "asr+it", "seen",
                            subtasks='["asr", "it"]',
                            sub_markers='["The transcription is:", "The answer to the text question is:"]',
                            sub_targets='["a b", "c"]'),
                        "The transcription is: a b The answer to the text question is: c"),  # followed
                       (row(1, "The speaking style is: sad The answer to the text question is: c", "er+it", "seen",
                            subtasks='["er", "it"]',
                            sub_markers='["The speaking style is:", "The answer to the text question is:"]',
                            sub_targets='["sad", "c"]'),
                        "The transcription is: a b The answer to the text question is: c"),  # not followed
                       (row(2, "The transcription is: a b The answer to the text question is: c", "asr+it", "unseen",
                            subtasks='["asr", "it"]',
                            sub_markers='["The transcription is:", "The answer to the text question is:"]',
                            sub_targets='["a b", "c"]'),
                        "The transcription is: a b")],  # not followed
    }
    for name, pairs in sets.items():
        write_manifest(str(corpus / f"{name}.tsv"), [r for r, _ in pairs], extra=EXTRA)
        (decode / f"generate-{name}.txt").write_text(generated([h for _, h in pairs]))
    return str(corpus), str(decode)


def test_rows_are_counted_right_wrong_another_task_or_neither(toy):
    res = breakdown(*toy)
    s = res["single"]
    asr_seen, asr_unseen = s["test_asr"]["seen"], s["test_asr"]["unseen"]
    assert (asr_seen["rows"], asr_seen["right"]) == (2, 2)
    assert (asr_unseen["right"], asr_unseen["asked task, wrong"], asr_unseen["another task"],
            asr_unseen["neither"]) == (0, 1, 1, 1)
    assert asr_unseen["answered instead"] == {"gender": 1}
    assert (s["test_er"]["seen"]["right"], s["test_er"]["seen"]["asked task, wrong"]) == (1, 1)
    assert s["test_er"]["seen"]["wrong labels"] == {"happy -> angry": 1}
    assert s["test_er"]["unseen"]["answered instead"] == {"asr": 1}
    assert (s["test_gender"]["seen"]["asked task, wrong"], s["test_gender"]["unseen"]["right"]) == (1, 1)
    assert res["multi"] == {"asr+it": {"seen": [1, 1], "unseen": [0, 1]}, "er+it": {"seen": [0, 1]}}
    table = format_breakdown(res)
    assert "| test_asr | unseen | 3 | 0 | 1 | 1 | 1 | gender 1 |  |" in table
    assert "| test_gender | seen | 1 | 0 | 1 | 0 | 0 |  | male -> female 1 |" in table
    assert "| asr+it | 1 of 1 | 0 of 1 |" in table and "| er+it | 0 of 1 |  |" in table


def test_nearest_task_by_relative_word_edit_distance():
    answers = {"gender": [["the", "speaker", "is", "male"]], "asr": [["a", "red", "cat", "finds", "the", "tree"]]}
    assert nearest_task("The speaker is female.", answers) == ("gender", 0.25)
    assert nearest_task("a red cat", answers) == ("asr", 0.5)
    assert nearest_task("x", {}) == (None, float("inf"))
    # the hypothesis is normalised as the scorer normalises it; the distance is the scorer's word edit distance
    assert nearest_task("The SPEAKER, is female!", answers) == ("gender", 0.25)
    ref, hyp = "a red cat finds the tree", "A red dog finds a tree."
    errors, n = word_errors(ref, hyp)  # 2 substitutions in 6 words
    assert nearest_task(hyp, {"asr": [words(ref)]}) == ("asr", errors / n) == ("asr", 2 / 6)


def test_cli_prints_the_table_and_writes_json(toy, tmp_path):
    out = subprocess.run([sys.executable, "-m", "wavllm_fairseq.toy.breakdown", "--corpus", toy[0], "--decode", toy[1],
                          "--json", str(tmp_path / "b.json")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "| test set | prompts |" in out.stdout
    assert json.load(open(tmp_path / "b.json"))["single"]["test_asr"]["seen"]["right"] == 2


def test_a_missing_decode_output_is_named(toy):
    os.remove(os.path.join(toy[1], "generate-test_er.txt"))
    with pytest.raises(SystemExit, match="generate-test_er.txt: missing"):
        breakdown(*toy)


def test_asr_rows_are_also_scored_per_sentence_source(tmp_path):
    from wavllm_fairseq.toy import tables

    d, n, v, o = tables.DETS[0], tables.NOUNS[0], tables.VERBS[0], tables.OBJECTS[0]
    grammar = f"{d} {n} {v} the {o}"  # 5 words
    grammar_place = f"{d} {tables.ADJS[0]} {n} {v} the {o} {tables.PLACES[0]}"
    prose = "the kettle started to whistle"  # 5 words, outside the grammar
    assert tables.is_grammar_sentence(grammar) and tables.is_grammar_sentence(grammar_place)
    assert not tables.is_grammar_sentence(prose) and not tables.is_grammar_sentence(grammar + " today")
    pairs = [(row(0, grammar, "asr", "seen"), grammar),  # 0 errors
             (row(1, prose, "asr", "seen"), "the kettle started to whisper"),  # 1 of 5
             (row(2, prose, "asr", "unseen"), "the kettle"),  # 3 of 5
             (row(3, grammar_place, "asr", "unseen"), grammar_place)]
    (tmp_path / "c").mkdir()
    (tmp_path / "d").mkdir()
    write_manifest(str(tmp_path / "c" / "test_asr.tsv"), [r for r, _ in pairs], extra=EXTRA)
    (tmp_path / "d" / "generate-test_asr.txt").write_text(generated([h for _, h in pairs]))
    res = breakdown(str(tmp_path / "c"), str(tmp_path / "d"))
    assert res["asr_sources"] == {"test_asr": {
        "seen": {"grammar": {"wer": 0.0, "rows": 1}, "open vocabulary": {"wer": 20.0, "rows": 1}},
        "unseen": {"grammar": {"wer": 0.0, "rows": 1}, "open vocabulary": {"wer": 60.0, "rows": 1}}}}
    assert "| test_asr | unseen | open vocabulary | 1 | 60.00 |" in format_breakdown(res)
