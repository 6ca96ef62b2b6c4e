"""The espeak-ng toy corpus: deterministic, valid, disjoint splits, multi-task targets in order; its tables
and prompt pools as data files."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from wavllm_fairseq.data.manifest import read_manifest
from wavllm_fairseq.tools.convert_s2t import convert_s2t_manifest
from wavllm_fairseq.toy import corpus as toy
from wavllm_fairseq.toy import tables
from wavllm_fairseq.toy.espeak import synthesize, word_starts
from wavllm_fairseq.toy.stage0 import word_frame_labels

ESPEAK = shutil.which("espeak-ng")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    assert ESPEAK, "espeak-ng is required (examples/wavllm/scripts/install.sh installs it)"
    root = tmp_path_factory.mktemp("toy")
    out = {}
    for name in ("a", "b"):
        d = str(root / name)
        res = subprocess.run([sys.executable, "-m", "wavllm_fairseq.toy.corpus", "--out", d, "--size", "small",
                              "--seed", "5"], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        out[name] = d
    out["log"] = res.stdout
    return out


def _digest(folder):
    h = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            if f == "corpus.json":
                continue
            p = os.path.join(dirpath, f)
            h[os.path.relpath(p, folder)] = hashlib.md5(open(p, "rb").read()).hexdigest()
    return h


def manifests(folder):
    return sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".tsv"))


def rows_of(folder, name):
    rows, _ = read_manifest(os.path.join(folder, name + ".tsv"))
    return rows


def test_same_seed_gives_identical_files_and_progress_is_shown(built):
    assert _digest(built["a"]) == _digest(built["b"])
    assert "[corpus] progress" in built["log"]


def test_every_manifest_validates_and_every_task_has_seen_and_unseen_tests(built):
    names = manifests(built["a"])
    for task in ("asr", "st", "sv", "er", "gender", "sqa", "it", "multi"):
        assert f"train_{task}" in names and f"valid_{task}" in names and f"test_{task}" in names
        pools = [r.extra["prompt_pool"] for r in rows_of(built["a"], f"test_{task}")]
        assert pools.count("seen") == pools.count("unseen") > 0, task
    for name in names:
        rows, report = read_manifest(os.path.join(built["a"], name + ".tsv"), check_audio="full")
        assert report.bad == 0 and report.ok == len(rows) > 0 and not report.warnings, (name, report)


def test_prompt_pools_have_ten_paraphrases_and_are_disjoint(built):
    pdir = os.path.join(built["a"], "prompts")
    for task in ("asr", "st", "sv", "er", "gender", "sqa", "it"):
        seen = set(open(os.path.join(pdir, f"{task}.seen.txt")).read().split("\n")) - {""}
        unseen = set(open(os.path.join(pdir, f"{task}.unseen.txt")).read().split("\n")) - {""}
        assert len(seen) >= 10 and len(unseen) >= 5 and not seen & unseen, task
    train_prompts = {r.prompt for r in rows_of(built["a"], "train_asr")}
    unseen_prompts = {r.prompt for r in rows_of(built["a"], "test_asr") if r.extra["prompt_pool"] == "unseen"}
    assert train_prompts and unseen_prompts and not train_prompts & unseen_prompts


def test_test_voices_and_sentences_never_occur_in_training(built):
    train = [r for n in manifests(built["a"]) if n.startswith("train_") and n != "train_it"
             for r in rows_of(built["a"], n)]
    test = [r for n in manifests(built["a"]) if n.startswith(("test_", "valid_")) and not n.startswith("test_it")
            and not n.startswith("valid_it") for r in rows_of(built["a"], n)]
    assert train and test
    voice = lambda r: r.extra["speaker"].split("+")[1]  # noqa: E731
    assert {voice(r) for r in test} == set(toy.TEST_VARIANTS)
    assert not {voice(r) for r in train} & set(toy.TEST_VARIANTS)
    train_text = {r.tgt_text for r in rows_of(built["a"], "train_asr")}
    test_text = {r.tgt_text for r in rows_of(built["a"], "test_asr")}
    assert test_text and not train_text & test_text
    # SV clips hold two sentences: none of them is a training sentence either
    all_train_sentences = {s for s, _ in toy.all_sentences() if toy.is_train_sentence(5, s)}
    assert not test_text & all_train_sentences


def test_multi_task_targets_answer_every_subtask_in_order(built):
    for name in ("train_multi", "valid_multi", "test_multi"):
        rows = rows_of(built["a"], name)
        assert rows
        combos = set()
        for r in rows:
            subtasks = json.loads(r.extra["subtasks"])
            markers = json.loads(r.extra["sub_markers"])
            targets = json.loads(r.extra["sub_targets"])
            combos.add(tuple(subtasks))
            assert len(subtasks) == len(markers) == len(targets) >= 2
            assert r.task == "+".join(subtasks)
            pos = 0
            for marker, target in zip(markers, targets):
                at = r.tgt_text.find(f"{marker} {target}", pos)
                assert at >= 0, (r.id, r.tgt_text, marker, target)
                pos = at + len(marker)
            connectors = toy.CONNECTORS[len(subtasks)]
            assert r.prompt.startswith(connectors[0]) and all(c in r.prompt for c in connectors)
        assert len(combos) == len(toy.MULTI) or name == "valid_multi"


def test_sv_and_style_labels_are_balanced(built):
    sv = rows_of(built["a"], "train_sv")
    labels = [r.extra["label"] for r in sv]
    assert labels.count("yes") == labels.count("no")
    styles = {r.extra["label"] for r in rows_of(built["a"], "train_er")}
    assert styles == set(toy.STYLES)


def test_a_second_run_is_cached(built):
    res = subprocess.run([sys.executable, "-m", "wavllm_fairseq.toy.corpus", "--out", built["a"], "--size", "small",
                          "--seed", "5"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "cached" in res.stdout


def test_library_synthesis_equals_the_command_and_reports_every_word(tmp_path):
    """espeak.synthesize (in-process library, fresh per call) writes the command's samples exactly,
    is repeatable, and places a start for every word, also for words espeak joins to a neighbour."""
    text = "the green cow carries the book in the garden"  # en-gb-scotland joins "in the"
    for voice, pitch, speed, amp in (("en-gb-scotland+f1", 50, 165, 100), ("en-us+m3", 70, 190, 200)):
        wav, sr, starts = synthesize(text, voice, pitch, speed, amp)
        again, _, starts_again = synthesize(text, voice, pitch, speed, amp)
        path = str(tmp_path / "cli.wav")
        subprocess.run([ESPEAK, "-v", voice, "-p", str(pitch), "-s", str(speed), "-a", str(amp), "-w", path, text],
                       check=True)
        cli, cli_sr = sf.read(path, dtype="int16")
        assert sr == cli_sr and np.array_equal(wav, cli) and np.array_equal(wav, again) and starts == starts_again
        assert len(starts) == 9 and starts[0] == 0 and all(a < b for a, b in zip(starts, starts[1:]))
        assert starts[-1] < len(wav)
    # a word without its own event is placed by character share between its neighbours' events
    # "the" starts 3 of the 7 characters into the span
    assert word_starts("in the park", [(1, 0), (8, 1100)], 2000) == [0, 471, 1100]


def test_word_alignments_cover_each_clip_in_order(built):
    rows = rows_of(built["a"], "train_asr") + rows_of(built["a"], "test_sv")
    for r in rows:
        spans = json.loads(r.extra["word_samples"])
        assert len(spans) == len(r.tgt_text.split()) or r.task == "sv", r.id
        assert all(0 <= s <= e <= r.n_frames for s, e in spans), r.id
        assert all(spans[k][1] <= spans[k + 1][0] for k in range(len(spans) - 1)), r.id
        assert spans[-1][1] - spans[0][0] > 0.5 * r.n_frames, r.id  # the words fill most of the clip


def test_frame_labels_follow_the_alignment():
    row = SimpleNamespace(id="x", n_frames=3200, extra={"word_samples": "[[300,1300],[1300,2600]]"})
    labels = word_frame_labels(row, [7, 9], 320)  # 10 frames of 20 ms
    assert labels.tolist() == [0, 7, 7, 7, 9, 9, 9, 9, 0, 0]
    with pytest.raises(ValueError, match="row x"):
        word_frame_labels(row, [7], 320)


# ------------------------------------------------------------------ the tables as data
def test_the_corpus_prompt_pools_are_the_package_prompt_files(built):
    for task in tables.SPEECH_TASKS:
        for i, pool in enumerate(("seen", "unseen")):
            pool_file = os.path.join(tables.PROMPT_DIR, f"{task}.{pool}.txt")
            with open(pool_file, "rb") as f, open(os.path.join(built["a"], "prompts", f"{task}.{pool}.txt"), "rb") as g:
                assert f.read() == g.read(), pool_file
            assert toy.PROMPTS[task][i] == tables.read_prompt_file(pool_file)
    train_prompts = {r.prompt for r in rows_of(built["a"], "train_sqa")}
    assert train_prompts <= set(toy.PROMPTS["sqa"][0])


def test_the_prompt_files_are_what_convert_s2t_manifest_reads(tmp_path):
    src = tmp_path / "s2t.tsv"
    src.write_text("id\taudio\tn_frames\ttgt_text\n" + "".join(f"u{i}\tx.wav\t16000\tthe cat\n" for i in range(300)))
    path = os.path.join(tables.PROMPT_DIR, "asr.seen.txt")
    counts = convert_s2t_manifest(str(src), str(tmp_path / "out.tsv"), task="asr", prompts=path, check_audio=False)
    rows = read_manifest(str(tmp_path / "out.tsv"))[0]
    assert counts["prompts"] == len(toy.PROMPTS["asr"][0]) >= 10
    assert {r.prompt for r in rows} == set(toy.PROMPTS["asr"][0])


def test_a_missing_or_empty_prompt_file_is_named(tmp_path):
    folder = tmp_path / "prompts"
    shutil.copytree(tables.PROMPT_DIR, folder)
    os.remove(folder / "st.unseen.txt")
    with pytest.raises(FileNotFoundError, match=r"st\.unseen\.txt is missing.*wavllm_fairseq/data/prompts"):
        tables.prompt_pools(str(folder))
    (folder / "st.unseen.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"st\.unseen\.txt holds no prompt"):
        tables.prompt_pools(str(folder) + os.sep)  # another cache entry
    (folder / "st.unseen.txt").write_text("Say it in German.\nA tab\\there.\n")
    assert tables.prompt_pools(str(folder) + os.sep + ".")["st"][1] == ["Say it in German.", "A tab\there."]


def test_the_data_tables_load_with_their_types_and_cover_the_grammar():
    words = set(toy.DETS + toy.ADJS + toy.NOUNS + toy.VERBS + toy.OBJECTS)
    assert words <= set(toy.DE) and set(toy.PLACES) == set(toy.DE_PLACES)
    assert toy.translate(dict(det="the", adj="red", noun="cat", verb="sees", obj="ball", place="at home")) == \
        "der rote katze sieht den ball zu hause"
    assert list(toy.STYLES) == ["neutral", "happy", "sad", "angry"] and toy.STYLES["sad"] == (-22, 0.72, 55)
    assert toy.CONNECTORS[3] == ["To begin,", "Then,", "Lastly,"] and all(isinstance(m, tuple) for m in toy.MULTI)
    assert {t for combo in toy.MULTI for t in combo} <= set(toy.MARKERS)
    assert len(toy.voices("train")) + len(toy.voices("test")) == len(toy.ACCENTS) * len(toy.FEMALE + toy.MALE)


def test_it_templates_answer_what_they_ask():
    answers = {t: fn("cake") for t, fn in toy.IT_TEMPLATES_SEEN + toy.IT_TEMPLATES_UNSEEN}
    assert answers["Translate the word {w} into German."] == answers["In German, what is {w}?"] == "kuchen"
    assert answers["Say {w} two times."] == "cake cake" and answers["How do you spell {w}?"] == "c-a-k-e"
    assert answers["Which letter does {w} start with?"] == "c" and answers["Uppercase the word {w}."] == "CAKE"
    assert len(toy.IT_TEMPLATES_SEEN) >= 10 and len(toy.IT_TEMPLATES_UNSEEN) >= 5
    assert not {t for t, _ in toy.IT_TEMPLATES_SEEN} & {t for t, _ in toy.IT_TEMPLATES_UNSEEN}
