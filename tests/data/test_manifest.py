"""Instruction manifests: parsing, every bad-row kind, validate CLI counts, S2T conversion."""
import logging
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import soundfile as sf

from wavllm_fairseq.data.audio import load_audio
from wavllm_fairseq.errors import ManifestError
from wavllm_fairseq.data.manifest import escape_cell, read_manifest, task_from_filename, unescape_cell, validate_main
from wavllm_fairseq.data.prompt_pools import pick
from wavllm_fairseq.tools.convert_s2t import convert_s2t_main, convert_s2t_manifest

HEADER = "id\taudio\tn_frames\tprompt\ttgt_text\twith_speech"


def tone(n, sr=16000, amp=0.3):
    return (amp * np.sin(2 * np.pi * 300 * np.arange(n) / sr)).astype(np.float32)


@pytest.fixture
def data(tmp_path):
    """A folder with clips/ok.wav (4000 samples), ok8k.flac (2000 at 8 kHz = 4000 at 16 kHz) and bad files."""
    clips = tmp_path / "clips"
    clips.mkdir()
    sf.write(str(clips / "ok.wav"), tone(4000), 16000)
    sf.write(str(clips / "ok8k.flac"), tone(2000, 8000), 8000)
    sf.write(str(clips / "long.wav"), tone(48000), 16000)
    sf.write(str(clips / "silent.wav"), np.zeros(1600, np.float32), 16000)
    (clips / "empty.wav").write_bytes(b"")
    (clips / "random.wav").write_bytes(np.random.default_rng(0).bytes(2000))
    (clips / "movie.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(100))
    full = (clips / "ok.wav").read_bytes()
    (clips / "cut.wav").write_bytes(full[: len(full) // 2])
    return tmp_path


def write_tsv(path, lines, raw_tail=b""):
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8") + raw_tail)
    return str(path)


def run_validate(argv, capsys):
    code = validate_main(argv)
    out = capsys.readouterr().out.strip().splitlines()
    return code, out


# ------------------------------------------------------------------------------------------ cells, names
def test_escape_round_trip():
    text = "a\tb\nc\\nd \\ e"
    assert "\t" not in escape_cell(text) and "\n" not in escape_cell(text)
    assert unescape_cell(escape_cell(text)) == text
    assert unescape_cell(r"C:\path\x") == r"C:\path\x"  # unknown escapes kept


@pytest.mark.parametrize("name,task", [("train_asr.tsv", "asr"), ("test_st_unseen.tsv", "st"),
                                       ("dev_sqqa_seen.tsv", "sqqa"), ("valid_asr+st.tsv", "asr+st"),
                                       ("/x/y/er.tsv", "er"), ("test.tsv", "test")])
def test_task_from_filename(name, task):
    assert task_from_filename(name) == task


# ------------------------------------------------------------------------------------------ reading
def test_read_good_manifest(data):
    # columns in another order, an extra column, every kind of good row
    lines = ["with_speech\tid\tprompt\taudio\ttgt_text\tn_frames\tspeaker",
             "True\tu1\tTranscribe the audio.\tclips/ok.wav\thello world\t4000\tspk1",
             "yes\tu2\t\tclips/ok8k.flac\tthe answer\t12345\tspk2",  # SQQA: spoken question, empty prompt
             "False\tu3\tSay a\\tb\\nc\t-\tline1\\nline2 \\\\ end\t\tspk3",  # text only, escapes
             '1\tu4\t["What is said?", "And who says it?"]\t' + str(data / "clips" / "ok.wav")
             + '\t["hello", "a man\\nindeed"]\t4000\t-']
    path = write_tsv(data / "test_asr_unseen.tsv", lines)
    rows, report = read_manifest(path)
    assert report.counts == {"rows": 4, "ok": 4, "bad": 0, "skipped": 0}
    u1, u2, u3, u4 = rows
    assert (u1.id, u1.audio, u1.n_frames, u1.prompt, u1.tgt_text, u1.with_speech, u1.task, u1.line) == (
        "u1", "clips/ok.wav", 4000, "Transcribe the audio.", "hello world", True, "asr", 2)
    assert u1.extra == {"speaker": "spk1"} and u1.turns == [("Transcribe the audio.", "hello world")]
    assert u2.prompt == "" and u2.with_speech and u2.n_frames == 12345  # audio not checked: value kept
    assert u3.prompt == "Say a\tb\nc" and u3.tgt_text == "line1\nline2 \\ end" and not u3.with_speech
    assert u3.n_frames == 0 and u3.line == 4
    assert u4.turns == [("What is said?", "hello"), ("And who says it?", "a man\nindeed")]
    assert (u4.prompt, u4.tgt_text) == ("What is said?", "a man\nindeed")
    rows, _ = read_manifest(path, task="override")
    assert rows[0].task == "override"


def test_task_column_wins_and_header_quirks(data):
    # BOM, CRLF line endings, blank line, a task column
    text = ("\ufeff" + HEADER + "\ttask\r\n" + "a\t-\t0\tq\tans\tFalse\tgender\r\n" + "\r\n"
            + "b\t-\t0\tq\tans\tFalse\t\r\n")
    path = data / "train_it.tsv"
    path.write_bytes(text.encode("utf-8"))
    rows, report = read_manifest(str(path))
    assert [(r.id, r.task, r.line, r.tgt_text) for r in rows] == [("a", "gender", 2, "ans"), ("b", "it", 4, "ans")]
    assert report.rows == 2 and any(":3: blank line" in w for w in report.warnings)


def test_n_frames_mismatch_is_a_warning(data):
    path = write_tsv(data / "m.tsv", [HEADER, "a\tclips/ok8k.flac\t12345\tq\tt\tTrue",
                                      "b\tclips/ok.wav\t4000\tq\tt\tTrue"])
    for mode in (True, "full"):
        rows, report = read_manifest(path, check_audio=mode)
        assert [r.n_frames for r in rows] == [4000, 4000]
        assert len(report.warnings) == 1
        w = report.warnings[0]
        assert w.startswith(f"{path}:2: id=a: warning:") and "12345" in w and "4000" in w


def test_missing_columns_are_fatal(data):
    # these columns are also a fairseq speech_to_text header, which the default format ("auto") reads as one
    # (tests/data/test_manifest_formats.py): as an instruction manifest the missing columns are fatal
    path = write_tsv(data / "m.tsv", ["id\taudio\tn_frames\ttgt_text", "a\t-\t0\tt"])
    with pytest.raises(ManifestError) as e:
        read_manifest(path, skip_bad=True, fmt="instruction")
    assert str(e.value).startswith(f"{path}:1: missing required column(s) prompt, with_speech")
    path = write_tsv(data / "m2.tsv", ["id\taudio\tn_frames\tprompt\ttgt_text", "a\t-\t0\tq\tt"])
    with pytest.raises(ManifestError) as e:
        read_manifest(path, skip_bad=True)
    assert str(e.value).startswith(f"{path}:1: missing required column(s) with_speech")
    with pytest.raises(ManifestError):
        read_manifest(str(data / "nope.tsv"))


# every kind of bad row, with the reason validate reports; the line number is the index + 2
BAD_ROWS = [
    ("fields", "x1\tclips/ok.wav\t4000\tq\tt\tTrue\textra"),
    ("fields", "x2\tclips/ok.wav\t4000\tq\tt"),
    ("n_frames", "x3\tclips/ok.wav\tabc\tq\tt\tTrue"),
    ("n_frames", "x4\tclips/ok.wav\t4000.5\tq\tt\tTrue"),
    ("with_speech", "x5\tclips/ok.wav\t4000\tq\tt\tmaybe"),
    ("empty_prompt", "x6\t-\t0\t \tt\tFalse"),
    ("empty_target", "x7\tclips/ok.wav\t4000\tq\t\tTrue"),
    ("duplicate_id", "good1\tclips/ok.wav\t4000\tq\tt\tTrue"),
    ("empty_id", "\tclips/ok.wav\t4000\tq\tt\tTrue"),
    ("turns", 'x8\tclips/ok.wav\t4000\t["a", "b"]\t["only one"]\tTrue'),
    ("turns", 'x9\tclips/ok.wav\t4000\t["a", "b"]\tplain\tTrue'),
    ("missing", "x10\t-\t4000\tq\tt\tTrue"),
    ("missing", "x11\tclips/none.wav\t4000\tq\tt\tTrue"),
    ("empty", "x12\tclips/empty.wav\t4000\tq\tt\tTrue"),
    ("corrupt", "x13\tclips/random.wav\t4000\tq\tt\tTrue"),
    ("unsupported", "x14\tclips/movie.m4a\t4000\tq\tt\tTrue"),
    ("corrupt", "x15\tclips/cut.wav\t4000\tq\tt\tTrue"),
    ("too_long", "x17\tclips/long.wav\t48000\tq\tt\tTrue"),
]
AUDIO_REASONS = {"missing", "empty", "corrupt", "unsupported", "too_long"}
# good4: silence is valid audio ("Is anyone speaking?"), a warning when the audio is decoded
GOOD_ROWS = ["good1\tclips/ok.wav\t4000\tq\tt\tTrue", "good2\t-\t-\tq\tt\tFalse",
             "good3\tclips/ok8k.flac\t999\tq\tt\tTrue", "good4\tclips/silent.wav\t1600\tq\tt\tTrue"]


@pytest.fixture
def bad_manifest(data):
    lines = [HEADER] + GOOD_ROWS + [row for _, row in BAD_ROWS]
    non_utf8 = b"x18\t-\t0\tq\t\xff\xfe bad bytes\tFalse\n"  # line len(lines) + 1
    return write_tsv(data / "train_asr.tsv", lines, raw_tail=non_utf8)


def test_validate_counts_every_bad_row(bad_manifest, capsys):
    code, out = run_validate([bad_manifest, "--max-audio-seconds", "2"], capsys)
    n_bad = len(BAD_ROWS) + 1
    assert code == 1
    assert out[-1] == f"rows {len(GOOD_ROWS) + n_bad} ok {len(GOOD_ROWS)} bad {n_bad}"
    problems = [line for line in out[:-1] if ": warning:" not in line]
    assert len(problems) == n_bad
    for i, (reason, _) in enumerate(BAD_ROWS):
        line = len(GOOD_ROWS) + 2 + i
        assert any(p.startswith(f"{bad_manifest}:{line}: ") and f": {reason}: " in p for p in problems), (reason, line)
    assert any(p.startswith(f"{bad_manifest}:{len(GOOD_ROWS) + n_bad + 1}: id=x18: encoding:") for p in problems)
    assert [p for p in problems if ": duplicate_id: " in p][0].count("line 2") == 1  # names the first use
    warnings = [line for line in out if ": warning:" in line]
    assert len(warnings) == 2 and "id=good3" in warnings[0] and "999" in warnings[0] and "4000" in warnings[0]
    assert "id=good4" in warnings[1] and "silent" in warnings[1]


def test_validate_no_audio_and_several_files(bad_manifest, data, capsys):
    n_audio_bad = sum(r in AUDIO_REASONS for r, _ in BAD_ROWS) - 1  # x10 (speech row, no audio cell) stays bad
    n_bad = len(BAD_ROWS) + 1 - n_audio_bad
    good = write_tsv(data / "test_er.tsv", [HEADER] + GOOD_ROWS)
    code, out = run_validate([bad_manifest, good, "--no-audio"], capsys)
    assert code == 1
    total = len(BAD_ROWS) + 1 + 2 * len(GOOD_ROWS)
    assert out[-1] == f"rows {total} ok {total - n_bad} bad {n_bad}"
    code, out = run_validate([good], capsys)
    assert code == 0 and out[-1] == "rows 4 ok 4 bad 0"
    code, out = run_validate([str(data / "absent.tsv"), good], capsys)
    assert code == 1 and out[0].startswith(str(data / "absent.tsv")) and out[-1] == "rows 4 ok 4 bad 0"


def test_first_bad_row_raises_without_skip(bad_manifest):
    with pytest.raises(ManifestError) as e:
        read_manifest(bad_manifest, check_audio="full")
    msg = str(e.value)
    first = len(GOOD_ROWS) + 2
    assert msg.startswith(f"{bad_manifest}:{first}: id=x1: has 7 tab-separated fields but the header has 6")
    assert "wavllm-validate-manifest" in msg and "task.skip_bad_rows=true" in msg
    assert e.value.reason == "fields" and e.value.row == first


def test_skip_bad_counts_and_logs(bad_manifest, caplog):
    with caplog.at_level(logging.WARNING):
        rows, report = read_manifest(bad_manifest, check_audio=True, skip_bad=True, max_audio_seconds=2)
    assert [r.id for r in rows] == ["good1", "good2", "good3", "good4"]
    assert report.bad == report.skipped == len(BAD_ROWS) + 1 and report.ok == 4  # + x18 (encoding)
    assert {p.reason for p in report.problems} == {r for r, _ in BAD_ROWS} | {"encoding"}
    assert sum("skipping bad row" in r.getMessage() for r in caplog.records) == len(BAD_ROWS) + 1


def test_token_limit_and_optional_target(data):
    lines = [HEADER, "a\t-\t0\tone two three\tfour five\tFalse", "b\t-\t0\tone\ttwo\tFalse",
             'c\t-\t0\t["one two", "three"]\t["four", "five six"]\tFalse', "d\t-\t0\tq\t\tFalse"]
    path = write_tsv(data / "m.tsv", lines)
    words = lambda s: len(s.split())  # noqa: E731
    rows, report = read_manifest(path, skip_bad=True, token_counter=words, max_text_tokens=4,
                                 require_target=False)
    assert [r.id for r in rows] == ["b", "d"]  # a: 5 tokens; c: 6 tokens over both turns
    assert [(p.line, p.reason) for p in report.problems] == [(2, "too_long_text"), (4, "too_long_text")]
    assert "5 tokens" in report.problems[0].message
    rows, report = read_manifest(path, skip_bad=True)
    assert [p.reason for p in report.problems] == ["empty_target"] and len(rows) == 3


# ------------------------------------------------------------------------------------------ S2T conversion
def test_convert_s2t(data, capsys):
    s2t = data / "s2t"
    s2t.mkdir()
    sf.write(str(s2t / "a.wav"), tone(2000, 8000), 8000)  # S2T n_frames in source samples: 2000
    zpath = s2t / "audio.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_STORED) as z:
        z.write(data / "clips" / "ok.wav", "ok.wav")
        info = z.getinfo("ok.wav")
    offset = info.header_offset + 30 + len("ok.wav")
    absolute = str(data / "clips" / "ok.wav")
    (data / "prompts.txt").write_text("Transcribe it.\n\nWrite down\\twhat is said.\nWhat is spoken?\n")
    s2t_lines = ["id\taudio\tn_frames\ttgt_text\tspeaker\tsrc_text",
                 "r1\ta.wav\t2000\tHallo Welt\tspk1\thello world",
                 f"r2\taudio.zip:{offset}:{info.file_size}\t4000\tback\\slash\tspk2\tsecond",
                 f"r3\t{absolute}\t4000\tdrei\tspk3\tthird"]
    src = write_tsv(s2t / "train.tsv", s2t_lines)
    dst = str(data / "out" / "train_asr.tsv")
    code = convert_s2t_main(["--input", src, "--output", dst, "--task", "asr", "--prompts",
                             str(data / "prompts.txt"), "--seed", "3", "--target-column", "src_text"])
    out = capsys.readouterr().out
    assert code == 0 and f"wrote 3 rows to {dst}" in out and "unreadable audio: 0" in out
    header = open(dst, encoding="utf-8").readline().rstrip("\n").split("\t")
    assert header == ["id", "audio", "n_frames", "prompt", "tgt_text", "with_speech", "task", "speaker",
                      "s2t_tgt_text"]
    rows, report = read_manifest(dst, check_audio="full")
    assert report.bad == 0 and report.warnings == []  # n_frames were measured: 8 kHz 2000 -> 4000
    assert [(r.tgt_text, r.n_frames, r.task, r.with_speech) for r in rows] == [
        ("hello world", 4000, "asr", True), ("second", 4000, "asr", True), ("third", 4000, "asr", True)]
    assert rows[1].extra == {"speaker": "spk2", "s2t_tgt_text": "back\\slash"}
    assert rows[0].audio == os.path.join("..", "s2t", "a.wav") and rows[2].audio == absolute
    root = os.path.dirname(dst)
    np.testing.assert_array_equal(load_audio(rows[1].audio, root), load_audio(absolute, ""))
    pool = ["Transcribe it.", "Write down\twhat is said.", "What is spoken?"]
    assert [r.prompt for r in rows] == [pool[pick(3, r.id, 3)] for r in rows]
    first = open(dst, "rb").read()
    convert_s2t_manifest(src, dst, task="asr", prompts=pool, seed=3, target_column="src_text")
    assert open(dst, "rb").read() == first  # deterministic; a list pool equals the file pool


def test_prompt_choice_is_seeded_and_spread():
    ids = [f"utt{i}" for i in range(200)]
    picks = [pick(1, i, 5) for i in ids]
    assert set(picks) == set(range(5)) and max(np.bincount(picks)) < 80
    assert picks == [pick(1, i, 5) for i in ids]
    assert sum(a != b for a, b in zip(picks, [pick(2, i, 5) for i in ids])) > 100


def test_convert_errors(data, capsys):
    src = write_tsv(data / "s.tsv", ["id\taudio\ttgt_text", "a\tx.wav\tt"])
    code = convert_s2t_main(["--input", src, "--output", str(data / "o.tsv"), "--task", "asr", "--prompts",
                             str(data / "missing_prompts.txt")])
    assert code == 1 and "prompt file" in capsys.readouterr().err
    with pytest.raises(ManifestError, match="missing column"):
        convert_s2t_manifest(src, str(data / "o.tsv"), task="asr", prompts=["p"])


def test_console_entry_point_runs(bad_manifest):
    code = "import sys; from wavllm_fairseq.data.manifest import validate_main; sys.exit(validate_main())"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + sys.path))
    proc = subprocess.run([sys.executable, "-c", code, bad_manifest, "--no-audio"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("rows ")
