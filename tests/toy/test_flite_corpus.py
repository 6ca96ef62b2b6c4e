"""The flite corpus of the real small recipe: held-out speakers, sentences and questions; every task of the
paper (SQQA and CoT included) with seen and unseen prompts; flite speakers that differ as the voices.json
table says."""
import os
import shutil

import numpy as np
import pytest

from wavllm_fairseq.data.manifest import read_manifest
from wavllm_fairseq.toy import corpus as toy
from wavllm_fairseq.toy import flite, flite_corpus, tables

# a corpus of a few clips per role: what the checks below need, in seconds of synthesis
TINY = dict(train=10, test=6, valid=2, sv_train=4, sv_test=4, multi_train=6, multi_test=4, it_train=4,
            sqqa_repeats=1, cot_train=4, prose_train=4, prose_test=2, prose_valid=1)


def _require_flite():
    assert shutil.which("flite"), "flite is required (examples/wavllm/scripts/install.sh installs it)"
    problem = flite.check_flite()
    assert problem is None, problem


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    _require_flite()
    out = str(tmp_path_factory.mktemp("flite"))
    mp = pytest.MonkeyPatch()
    mp.setitem(toy.FLITE_SIZES, "small", TINY)
    # the questions: a handful, or synthesis takes a minute
    few = tables.SQQA_QUESTIONS[:14]
    mp.setattr(flite_corpus, "SQQA_QUESTIONS", few)
    try:
        meta = toy.build(out, 3, "small", 2, synth="flite")
    finally:
        mp.undo()
    return out, meta


def _rows(folder, name):
    """The manifest's rows as dicts of every column."""
    rows, _ = read_manifest(os.path.join(folder, name + ".tsv"))
    return [dict(r.extra, id=r.id, audio=r.audio, prompt=r.prompt, tgt_text=r.tgt_text, task=r.task) for r in rows]


def test_training_and_test_speakers_are_disjoint_and_both_genders_are_in_each():
    train, test = set(flite.speakers("train")), set(flite.speakers("test"))
    assert train and test and not train & test
    for split in (train, test):
        assert {flite.gender(v) for v, _, _ in split} == {"female", "male"}
    assert len({flite.speaker_name(s) for s in train | test}) == len(train | test)  # names tell them apart


def test_held_out_questions_are_a_seeded_disjoint_share():
    a, b = flite_corpus.question_split(1), flite_corpus.question_split(1)
    assert a == b
    train_q = {q for q, _, _ in a["train"]}
    test_q = {q for q, _, _ in a["test"]}
    assert not train_q & test_q and len(train_q | test_q) == len(tables.SQQA_QUESTIONS)
    share = len(test_q) / len(tables.SQQA_QUESTIONS)
    assert 0.15 < share < 0.45
    assert flite_corpus.question_split(2)["test"] != a["test"]


def test_drawn_clips_keep_test_speakers_sentences_and_questions_out_of_training():
    rng = np.random.default_rng(0)
    sents = tables.all_sentences()
    train_s = [s for s in sents if tables.is_train_sentence(0, s[0])]
    test_s = [s for s in sents if not tables.is_train_sentence(0, s[0])]
    clips = flite_corpus.draw_all(0, dict(TINY, train=60, test=30), train_s, test_s, rng)
    test_names = {flite.speaker_name(s) for s in flite.speakers("test")}
    train_texts = {c["text"] for k in ("train", "sv_train", "sqqa_train", "prose_train") for c in clips[k]}
    for role, cs in clips.items():
        utter_speakers = {flite.speaker_name(tuple(p[1])) for c in cs for p in c["synth"]}
        if role.endswith("train") or role == "train":
            assert not utter_speakers & test_names, role
        else:
            assert utter_speakers <= test_names, role
            assert not {c["text"] for c in cs} & train_texts, role
    for c in clips["sqqa_test"]:
        assert c["answer"] and c["answer_words"]
    prose = flite_corpus.prose_split(0)
    assert not set(prose["train"]) & set(prose["test"]) and len(prose["test"]) > 20
    assert {c["text"] for c in clips["prose_train"]} <= set(prose["train"])
    assert not {c["text"] for c in clips["prose_test"]} & {c["text"] for c in clips["prose_valid"]}
    sv = clips["sv_test"]
    assert {c["same"] for c in sv} == {True, False}
    for c in sv:
        (_, a, _), (_, b, _) = c["synth"]
        assert (tuple(a) == tuple(b)) == c["same"]


def test_a_warp_and_a_style_change_the_voice_as_stated():
    _require_flite()
    rng = np.random.default_rng(0)
    neutral = dict(tables.FLITE["styles"]["neutral"])
    base = flite.synthesize("the cat sat on the mat", ("slt", 1.0, 200.0), neutral)
    up = flite.synthesize("the cat sat on the mat", ("slt", 1.1, 200.0), neutral)
    assert base.dtype == np.float32 and np.abs(base).max() <= 1.0 and np.abs(base).max() > 0.1
    # a longer vocal tract (warp > 1) plays back faster at the same duration setting: about 1/warp as long
    assert 0.8 < len(up) / len(base) < 1.0
    styles = list(tables.FLITE["styles"])
    lengths = {s: len(flite.synthesize("the cat sat on the mat", ("rms", 1.0, 0.0), flite.style_settings(s, rng)))
               for s in styles}
    assert len(set(lengths.values())) > 1  # styles move tempo


def test_the_built_corpus_covers_every_task_with_seen_and_unseen_tests(built):
    out, meta = built
    names = set(meta["counts"])
    for task in ("asr", "st", "sv", "er", "gender", "sqa", "sqqa", "cot", "multi"):
        assert f"test_{task}" in names, task
    for name in ("train_sqqa", "train_cot", "valid_sqqa", "valid_cot"):
        assert name in names
    for task in ("asr", "sqqa", "cot"):
        rows = _rows(out, f"test_{task}")
        assert {r["prompt_pool"] for r in rows} == {"seen", "unseen"}, task
        seen = {r["prompt"] for r in rows if r["prompt_pool"] == "seen"}
        unseen = {r["prompt"] for r in rows if r["prompt_pool"] == "unseen"}
        assert not seen & unseen, task
    assert meta["voices"] == "flite" and not set(meta["train_voices"]) & set(meta["test_voices"])


def test_asr_rows_go_beyond_the_grammar_with_held_out_prose_in_valid_and_test(built):
    out, _ = built
    grammar = {t for t, _ in tables.all_sentences()}
    train = {r["transcript"] for r in _rows(out, "train_asr")}
    held = {q for q, _, _ in flite_corpus.question_split(3)["test"]}
    questions = {q for q, _, _ in tables.SQQA_QUESTIONS[:14]} - held  # the fixture's training questions
    assert questions and questions <= train  # the spoken training questions, as ASR rows
    prose_train = train - grammar - questions
    assert len(prose_train) == TINY["prose_train"] and prose_train <= set(tables.PROSE)
    for split, n in (("valid", TINY["prose_valid"]), ("test", 2 * TINY["prose_test"])):
        rows = [r for r in _rows(out, f"{split}_asr") if r["transcript"] not in grammar]
        assert len(rows) == n and all(r["tgt_text"] == r["transcript"] for r in rows), split
        assert not {r["transcript"] for r in rows} & train, split


def test_sqqa_rows_answer_the_spoken_question_and_cot_rows_give_the_steps_in_order(built):
    out, meta = built
    held = set(meta["test_questions"])
    for r in _rows(out, "test_sqqa"):
        assert r["transcript"] in held and r["tgt_text"].startswith("The answer is ") and r["label"]
        assert os.path.isfile(os.path.join(out, r["audio"]))
    assert not {r["transcript"] for r in _rows(out, "train_sqqa")} & held
    for r in _rows(out, "test_cot"):
        target = r["tgt_text"]
        steps = [target.index(k) for k in ("Transcription: ", "German: ", "Object: ")]
        assert steps == sorted(steps) and r["transcript"] in target
