"""Manifests in other formats read as instruction rows: the reference's test sets (their exact layouts, our own
content), segments of a file, literal cells, fairseq's wav2vec/HuBERT manifests and speech_to_text TSVs."""
import os
import zipfile

import numpy as np
import pytest
import soundfile as sf

from helpers import make_corpus, tone
from wavllm_fairseq.data.audio import num_frames_16k
from wavllm_fairseq.data.manifest import read_manifest, task_from_filename, validate_main
from wavllm_fairseq.data.manifest_formats import PROMPT_SEED, detect_format, ltr_to_words
from wavllm_fairseq.data.prompt_pools import pick, read_pool
from wavllm_fairseq.errors import ManifestError, WavLLMInputError
from wavllm_fairseq.tasks.instruction import WavLLMInstructionConfig, WavLLMInstructionTask
from wavllm_fairseq.tools.convert_s2t import convert_s2t_manifest

# the reference's test_data: audio paths relative to its audio_root (the working directory it runs in)
REF_AUDIO = "SpeechT5/WavLLM/fairseq/examples/wavllm/test_data/audio"
BASE = ["id", "audio", "n_frames", "prompt", "tgt_text", "with_speech"]
# file -> (columns in the reference's order, header line end, row line end, last row ends its line)
LAYOUTS = {
    "asr.tsv": (BASE, "\n", "\n", True),
    "sv.tsv": (BASE, "\n", "\n", True),
    "en2de.tsv": (["id", "audio", "n_frames", "tgt_text", "prompt", "with_speech"], "\n", "\n", True),
    "emo.tsv": (BASE, "\r\n", "\r\n", True),
    "SQA.tsv": (BASE, "\n", "\n", True),
    "SQQA.tsv": (BASE, "\r\n", "", False),
    "II-task.tsv": (["id", "audio", "n_frames", "with_speech", "prompt", "tgt_text"], "\n", "", False),
    "CoT-task.tsv": (["id", "audio", "n_frames", "prompt", "with_speech", "tgt_text"], "\n", "", False),
    "CoT-task-story.tsv": (BASE + ["orig_story"], "\r\n", "", False),
    "gaokao.tsv": (BASE, "\n", "\n", True),
}
# our own content: (file, audio file, n_frames cell, prompt, target, task it is scored as)
CONTENT = [
    ("asr.tsv", "asr.flac", "9600", "Write down what is said in the clip.", "a red cat sleeps", "asr"),
    ("sv.tsv", "sv.wav", "12800", "Is there only one speaker in the audio clip?", "No", "sv"),
    ("en2de.tsv", "st.flac", "8000", "Translate the audio clip into German.", "Die Katze schlaeft.", "st"),
    ("emo.tsv", "emo.wav", "12345", "What emotion does the voice carry?", "happy", "er"),
    ("SQA.tsv", "sqa.wav", "111111", "Who speaks first? A. A man; B. A woman.", "B", "sqa"),
    ("SQQA.tsv", "sqqa.wav", "4321", "", "Two plus two is four.", "sqqa"),
    ("II-task.tsv", "II-task.wav", "111111", "To begin, transcribe the clip; Lastly, name a colour", "ASR+SFT",
     "multi"),
    ("CoT-task.tsv", "CoT-task.wav", "5555", "First of all, transcribe; Lastly translate the summary into German.",
     "Eine Katze schlaeft.", "cot"),
    ("CoT-task-story.tsv", "CoT-task-story.wav", "7777", "First of all, transcribe the recording.",
     "Eine Geschichte.", "cot"),
]


def write_reference_file(path, columns, header_end, row_end, final, rows):
    lines = ["\t".join(columns) + header_end]
    for i, r in enumerate(rows):
        last = i == len(rows) - 1
        lines.append("\t".join(str(r[c]) for c in columns) + (row_end if (final or not last) else ""))
    if not final and not rows:
        lines[-1] = lines[-1].rstrip("\r\n")
    path.write_bytes("".join(lines).encode("utf-8"))
    return str(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """<root>/SpeechT5/WavLLM/fairseq/examples/wavllm/test_data/{*.tsv, audio/}, gaokao_audio/ under <root>."""
    root = tmp_path_factory.mktemp("ref_root")
    test_data = root / REF_AUDIO / ".."
    (root / REF_AUDIO).mkdir(parents=True)
    (root / "gaokao_audio").mkdir()
    lengths = {}
    for k, (name, audio, *_rest) in enumerate(CONTENT):
        sr = 44100 if audio in ("II-task.wav", "sqa.wav") else 16000  # two of the reference's clips are 44.1 kHz
        wav = tone(0.4 + 0.1 * k, 200 + 30 * k, k)
        if sr != 16000:
            wav = np.interp(np.arange(int(len(wav) * sr / 16000)) * 16000 / sr, np.arange(len(wav)), wav)
        sf.write(str(root / REF_AUDIO / audio), wav.astype(np.float32), sr)
        lengths[name] = num_frames_16k(sf.info(str(root / REF_AUDIO / audio)).frames, sr)
    for name, audio, n, prompt, target, _ in CONTENT:
        row = dict(id="0", audio=f"{REF_AUDIO}/{audio}", n_frames=n, prompt=prompt, tgt_text=target,
                   with_speech="True", orig_story="Once upon a time, a cat slept.")
        write_reference_file(test_data / name, *LAYOUTS[name], [row])
    gaokao = []
    for i in (1, 10):
        sf.write(str(root / "gaokao_audio" / f"short_conv_{i}.wav"), tone(0.5, 300 + i, i), 16000)
        gaokao.append(dict(id=f"short_conv_{i}", audio=f"gaokao_audio/short_conv_{i}.wav", n_frames="111111",
                           prompt=f"What does the man want? A. Tea; B. Milk {i}.", tgt_text="A", with_speech="True"))
    write_reference_file(test_data / "gaokao.tsv", *LAYOUTS["gaokao.tsv"], gaokao)
    return {"root": str(root), "data": os.path.normpath(str(test_data)), "lengths": lengths}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(str(tmp_path_factory.mktemp("corpus")), n_train=2, n_test=2)


def task_for(corpus, data, **cfg):
    return WavLLMInstructionTask.setup_task(WavLLMInstructionConfig(data=data, tokenizer_dir=corpus["tok"], **cfg))


# ------------------------------------------------------------------------------------------ reference test sets
def test_reference_layouts_are_written_as_the_reference_has_them(reference):
    raw = open(os.path.join(reference["data"], "SQQA.tsv"), "rb").read()
    assert raw.startswith(b"id\taudio\tn_frames\tprompt\ttgt_text\twith_speech\r\n0\tSpeechT5/WavLLM/fairseq/")
    assert not raw.endswith(b"\n")  # the reference's SQQA.tsv ends without a newline
    assert open(os.path.join(reference["data"], "en2de.tsv")).readline() == "id\taudio\tn_frames\ttgt_text\tprompt\t" \
                                                                            "with_speech\n"


@pytest.mark.parametrize("name, audio, n, prompt, target, task", CONTENT)
def test_reference_test_sets_read_with_the_reference_s_audio_root(reference, name, audio, n, prompt, target, task):
    path = os.path.join(reference["data"], name)
    rows, report = read_manifest(path, check_audio=True, audio_root=reference["root"])
    assert len(rows) == 1 and report.bad == 0
    r = rows[0]
    assert (r.id, r.prompt, r.tgt_text, r.task, r.with_speech) == ("0", prompt, target, task, True)
    assert r.n_frames == reference["lengths"][name]  # the placeholders (12345, 111111, ...) are replaced
    assert any(n in w for w in report.warnings) or int(n) == r.n_frames
    # the project's own default (audio relative to the manifest's folder) names the file and the option
    with pytest.raises(ManifestError) as e:
        read_manifest(path, check_audio=True)
    assert e.value.reason == "missing" and f"{name}:2: id=0: audio" in str(e.value)
    assert "task.audio_root" in str(e.value)


def test_gaokao_paths_and_the_task_and_dataset_resolve_against_audio_root(reference, corpus):
    rows, _ = read_manifest(os.path.join(reference["data"], "gaokao.tsv"), check_audio=True,
                            audio_root=reference["root"])
    assert [(r.id, r.task, r.n_frames) for r in rows] == [("short_conv_1", "sqa", 8000), ("short_conv_10", "sqa", 8000)]
    task = task_for(corpus, reference["data"], audio_root=reference["root"])
    ds = task.load_dataset("gaokao")
    expected = sf.read(os.path.join(reference["root"], "gaokao_audio", "short_conv_10.wav"), dtype="float32")[0]
    np.testing.assert_array_equal(ds[1]["audio"], expected)
    assert ds[1]["task"] == "sqa"
    relative = os.path.relpath(reference["root"])  # the reference's meaning: relative to the working directory
    assert task_for(corpus, reference["data"], audio_root=relative).load_dataset("en2de")[0]["audio"] is not None


def test_literal_cells_are_selectable_and_auto_keeps_the_project_s_escapes(tmp_path):
    sf.write(str(tmp_path / "a.wav"), tone(0.3, 300, 0), 16000)
    path = write_reference_file(tmp_path / "asr.tsv", *LAYOUTS["asr.tsv"], [
        dict(id="0", audio="a.wav", n_frames="4800", prompt="Say it\\nthen stop", tgt_text="back\\\\slash \\t tab",
             with_speech="True"),
        dict(id="1", audio="a.wav", n_frames="4800", prompt='["What is said?", "And then?"]',
             tgt_text='["a cat", "a dog"]', with_speech="True")])
    literal, report = read_manifest(path, fmt="reference")
    assert report.format == "reference manifest"
    assert (literal[0].prompt, literal[0].tgt_text) == ("Say it\\nthen stop", "back\\\\slash \\t tab")
    assert literal[1].turns == [('["What is said?", "And then?"]', '["a cat", "a dog"]')]  # one turn, as written
    escaped, report = read_manifest(path)
    assert report.format == "instruction manifest"
    assert (escaped[0].prompt, escaped[0].tgt_text) == ("Say it\nthen stop", "back\\slash \t tab")
    assert escaped[1].turns == [("What is said?", "a cat"), ("And then?", "a dog")]


@pytest.mark.parametrize("name, task", [("en2de.tsv", "st"), ("en2ja.tsv", "st"), ("test_en2zh_unseen.tsv", "st"),
                                        ("emo.tsv", "er"), ("SQA.tsv", "sqa"), ("SQQA.tsv", "sqqa"),
                                        ("gaokao.tsv", "sqa"), ("II-task.tsv", "multi"), ("CoT-task.tsv", "cot"),
                                        ("CoT-task-story.tsv", "cot"), ("asr.tsv", "asr"), ("sv.tsv", "sv"),
                                        ("test_er.tsv", "er"), ("valid_asr+st.tsv", "asr+st"), ("test.tsv", "test"),
                                        ("train2.tsv", "train2")])
def test_reference_file_names_map_to_the_project_s_tasks(name, task):
    assert task_from_filename(name) == task


# ------------------------------------------------------------------------------------------ segments
def segment_manifest(tmp_path, rows, columns=BASE + ["start_frame", "end_frame"]):
    return write_reference_file(tmp_path / "seg.tsv", columns, "\n", "\n", True, rows)


def test_segment_columns_choose_the_samples_a_row_reads(tmp_path, corpus):
    wav = (tone(1.0, 250, 1) * np.linspace(0.1, 1.0, 16000)).astype(np.float32)
    sf.write(str(tmp_path / "long.wav"), wav, 16000, subtype="FLOAT")
    sf.write(str(tmp_path / "long8k.wav"), wav[::2], 8000, subtype="FLOAT")
    rows = [dict(id="a", audio="long.wav", n_frames="111111", prompt="p", tgt_text="t", with_speech="True",
                 start_frame="3200", end_frame="8000"),
            dict(id="b", audio="long8k.wav", n_frames="0", prompt="p", tgt_text="t", with_speech="True",
                 start_frame="800", end_frame="2400"),  # the 8 kHz file's own samples: 0.2 s of audio
            dict(id="c", audio="long.wav", n_frames="16000", prompt="p", tgt_text="t", with_speech="True",
                 start_frame="", end_frame="")]  # both empty: the whole file
    path = segment_manifest(tmp_path, rows)
    got, report = read_manifest(path, check_audio=True)
    assert [(r.segment, r.n_frames) for r in got] == [((3200, 8000), 4800), ((800, 2400), 3200), (None, 16000)]
    ds = task_for(corpus, str(tmp_path)).load_corpus("seg", shuffle=False)
    np.testing.assert_array_equal(ds[0]["audio"], wav[3200:8000])
    assert len(ds[1]["audio"]) == 3200 and len(ds[2]["audio"]) == 16000
    assert ds.sizes.tolist() == [4800, 3200, 16000]  # batching costs are the segments' lengths


@pytest.mark.parametrize("start, end, reason, words", [("9000", "17000", "segment", "ends after the file's 16000"),
                                                       ("800", "800", "segment", "is empty"),
                                                       ("1.5", "800", "segment", "whole numbers"),
                                                       ("100", "", "segment", "whole numbers")])
def test_bad_segments_name_file_and_row(tmp_path, start, end, reason, words):
    sf.write(str(tmp_path / "long.wav"), tone(1.0, 250, 1), 16000)
    path = segment_manifest(tmp_path, [dict(id="a", audio="long.wav", n_frames="16000", prompt="p", tgt_text="t",
                                            with_speech="True", start_frame=start, end_frame=end)])
    with pytest.raises(ManifestError) as e:
        read_manifest(path, check_audio=True)
    assert e.value.reason == reason and f"{path}:2: id=a:" in str(e.value) and words in str(e.value)
    _, report = read_manifest(path, check_audio=True, skip_bad=True)
    assert (report.bad, report.skipped) == (1, 1)


def test_one_segment_column_alone_is_a_header_error(tmp_path):
    path = segment_manifest(tmp_path, [], columns=BASE + ["start_frame"])
    with pytest.raises(ManifestError, match="only one of the segment columns"):
        read_manifest(path)


# ------------------------------------------------------------------------------------------ wav2vec / HuBERT
LIBRI = ["train-clean-100/103/1240/103-1240-0000.flac", "train-clean-100/103/1240/103-1240-0001.flac",
         "train-clean-100/1034/121119/1034-121119-0000.flac"]
WORDS = ["CHAPTER ONE MISSUS RACHEL LYNDE IS SURPRISED", "THAT HAD ITS SOURCE AWAY BACK IN THE WOODS",
         "IT'S A FINE DAY"]


def librispeech(tmp_path, labels=("wrd",), name="train"):
    """A wav2vec manifest as examples/wav2vec/wav2vec_manifest.py and libri_labels.py write it."""
    audio = tmp_path / "LibriSpeech"
    lengths = []
    for k, rel in enumerate(LIBRI):
        (audio / os.path.dirname(rel)).mkdir(parents=True, exist_ok=True)
        wav = tone(0.3 + 0.1 * k, 220 + 20 * k, k)
        sf.write(str(audio / rel), wav, 16000)
        lengths.append(len(wav))
    manifests = tmp_path / "manifests"
    manifests.mkdir(exist_ok=True)
    (manifests / f"{name}.tsv").write_text(str(audio) + "\n" + "".join(f"{r}\t{n}\n" for r, n in zip(LIBRI, lengths)))
    if "wrd" in labels:
        (manifests / f"{name}.wrd").write_text("".join(w + "\n" for w in WORDS))
    if "ltr" in labels:
        (manifests / f"{name}.ltr").write_text("".join(" ".join(w.replace(" ", "|")) + " |\n" for w in WORDS))
    return str(manifests / f"{name}.tsv"), str(audio)


def test_wav2vec_manifest_with_wrd_labels_reads_as_asr(tmp_path):
    path, audio = librispeech(tmp_path)
    assert detect_format(open(path, "rb").read().split(b"\n")) == "wav2vec"
    rows, report = read_manifest(path, check_audio="full")
    assert report.bad == 0 and report.warnings == [] and "wav2vec" in report.format and ".wrd" in report.format
    pool = read_pool("asr.seen")
    ids = [os.path.splitext(r)[0] for r in LIBRI]
    assert [(r.id, r.tgt_text, r.task, r.with_speech) for r in rows] == [(i, w, "asr", True)
                                                                         for i, w in zip(ids, WORDS)]
    assert [r.prompt for r in rows] == [pool[pick(PROMPT_SEED, i, len(pool))] for i in ids]
    assert rows[2].audio == os.path.join(audio, LIBRI[2])
    # the prompt depends on the row alone: the same rows in another order and subset get the same prompts
    lines = open(path).read().splitlines()
    (tmp_path / "manifests" / "sub.tsv").write_text("\n".join([lines[0], lines[3], lines[1]]) + "\n")
    (tmp_path / "manifests" / "sub.wrd").write_text(f"{WORDS[2]}\n{WORDS[0]}\n")
    sub, _ = read_manifest(str(tmp_path / "manifests" / "sub.tsv"))
    assert [(r.id, r.prompt) for r in sub] == [(rows[2].id, rows[2].prompt), (rows[0].id, rows[0].prompt)]
    unseen, _ = read_manifest(path, prompt_pool="asr.unseen")
    assert all(r.prompt in read_pool("asr.unseen") for r in unseen)


def test_wav2vec_ltr_labels_and_label_errors(tmp_path):
    assert ltr_to_words("H E | S A I D |") == "HE SAID"
    path, _ = librispeech(tmp_path, labels=("ltr",))
    rows, report = read_manifest(path)
    assert [r.tgt_text for r in rows] == WORDS and ".ltr" in report.format
    with open(path[:-4] + ".ltr", "a") as f:
        f.write("E X T R A |\n")
    with pytest.raises(ManifestError) as e:
        read_manifest(path)
    assert e.value.reason == "labels" and "4 transcripts for the 3 rows" in str(e.value)
    assert str(e.value).startswith(path[:-4] + ".ltr")
    os.remove(path[:-4] + ".ltr")
    with pytest.raises(ManifestError, match=r"neither .*train\.wrd nor .*train\.ltr exists"):
        read_manifest(path)
    assert [r.tgt_text for r in read_manifest(path, require_target=False)[0]] == ["", "", ""]  # decode-only


def test_wav2vec_bad_rows_name_the_line(tmp_path):
    path, audio = librispeech(tmp_path)
    lines = open(path).read().splitlines()
    lines[2] = lines[2] + "\textra"
    open(path, "w").write("\n".join(lines) + "\n")
    with open(path[:-4] + ".wrd", "w") as f:
        f.write(f"{WORDS[0]}\n{WORDS[1]}\n\n")  # row 3's transcript is empty
    _, report = read_manifest(path, skip_bad=True)
    assert [(p.line, p.reason) for p in report.problems] == [(3, "fields"), (4, "empty_target")]
    assert "line 3 of" in report.problems[1].message and report.ok == 1


# ------------------------------------------------------------------------------------------ speech_to_text
def s2t_folder(tmp_path, extra_columns=(), extra_cells=()):
    """A fairseq speech_to_text TSV (prep_*_data.py --use-audio-input): wav paths and a zip member."""
    folder = tmp_path / "s2t"
    (folder / "flac").mkdir(parents=True, exist_ok=True)
    wavs = [tone(0.3, 300, 0), tone(0.4, 330, 1)]
    sf.write(str(folder / "flac" / "u0.flac"), wavs[0], 16000)
    sf.write(str(folder / "flac" / "u1.wav"), wavs[1], 16000)
    with zipfile.ZipFile(folder / "flac.zip", "w", compression=zipfile.ZIP_STORED) as z:
        z.write(folder / "flac" / "u1.wav", "u1.wav")
        info = z.getinfo("u1.wav")
    spec = f"flac.zip:{info.header_offset + 30 + len('u1.wav')}:{info.file_size}"
    header = ["id", "audio", "n_frames", "tgt_text", "speaker", *extra_columns]
    rows = [["u0", "flac/u0.flac", str(len(wavs[0])), "hello world", "spk1"],
            ["u1", spec, str(len(wavs[1])), "back\\slash kept", "spk2"]]
    lines = ["\t".join(header)] + ["\t".join(r + list(extra_cells)) for r in rows]
    (folder / "train.tsv").write_text("\n".join(lines) + "\n")
    return str(folder / "train.tsv"), wavs


def test_s2t_tsv_reads_as_asr_like_its_conversion(tmp_path):
    path, wavs = s2t_folder(tmp_path)
    rows, report = read_manifest(path, check_audio="full")
    assert report.bad == 0 and report.warnings == [] and "speech_to_text" in report.format
    assert [(r.id, r.tgt_text, r.task, r.extra["speaker"]) for r in rows] == [
        ("u0", "hello world", "asr", "spk1"), ("u1", "back\\slash kept", "asr", "spk2")]  # cells read literally
    converted = str(tmp_path / "out" / "train_asr.tsv")
    convert_s2t_manifest(path, converted, task="asr", prompts="asr.seen")  # seed 0, the direct reading's
    back, _ = read_manifest(converted)
    assert [(r.id, r.prompt, r.tgt_text, r.task) for r in back] == [(r.id, r.prompt, r.tgt_text, r.task) for r in rows]


def test_s2t_target_language_column_makes_st_rows(tmp_path, corpus):
    path, _ = s2t_folder(tmp_path, ["src_lang", "tgt_lang"], ["en", "de"])
    rows, _ = read_manifest(path)
    assert [r.task for r in rows] == ["st", "st"] and all(r.prompt in read_pool("st.seen") for r in rows)
    path, _ = s2t_folder(tmp_path, ["tgt_lang"], ["en"])  # ASR in the mTEDx layout: tgt_lang = the speech's
    assert [r.task for r in read_manifest(path)[0]] == ["asr", "asr"]
    path, _ = s2t_folder(tmp_path, ["tgt_lang"], ["ja"])  # the shipped ST prompts ask for German
    with pytest.raises(ManifestError) as e:
        read_manifest(path)
    assert e.value.reason == "prompt_pool" and f"{path}:2: id=u0:" in str(e.value) and "'ja'" in str(e.value)
    (tmp_path / "ja.txt").write_text("Translate the audio into Japanese.\n")
    rows, _ = read_manifest(path, prompt_pool=str(tmp_path / "ja.txt"))
    assert [(r.task, r.prompt) for r in rows] == [("st", "Translate the audio into Japanese.")] * 2
    path, _ = s2t_folder(tmp_path)  # MuST-C en-de has no tgt_lang column: a named ST pool says the task
    rows, _ = read_manifest(path, prompt_pool="st.unseen")
    assert [r.task for r in rows] == ["st", "st"] and all(r.prompt in read_pool("st.unseen") for r in rows)
    with pytest.raises(WavLLMInputError, match="no shipped pool of that name"):
        read_manifest(path, prompt_pool="xx.seen")
    ds = task_for(corpus, os.path.dirname(path), prompt_pool="st.unseen").load_dataset("train")
    assert ds[1]["task"] == "st" and ds[1]["row"].prompt == rows[1].prompt


def test_s2t_feature_rows_fail_saying_waveforms_are_needed(tmp_path):
    folder = tmp_path / "fbank"
    folder.mkdir()
    np.save(folder / "u0.npy", np.zeros((30, 80), np.float32))
    (folder / "train.tsv").write_text("id\taudio\tn_frames\ttgt_text\tspeaker\nu0\tu0.npy\t30\thello\tspk\n")
    with pytest.raises(ManifestError) as e:
        read_manifest(str(folder / "train.tsv"), check_audio=True)
    assert e.value.reason == "unsupported" and "train.tsv:2: id=u0" in str(e.value)
    assert "features, not a waveform" in str(e.value)


def test_forced_formats_and_unknown_format(tmp_path):
    path, _ = s2t_folder(tmp_path)
    with pytest.raises(ManifestError, match="missing required column"):
        read_manifest(path, fmt="instruction")
    with pytest.raises(ManifestError, match="unknown manifest format 'kaldi'"):
        read_manifest(path, fmt="kaldi")


def test_validate_takes_the_task_s_format_audio_root_and_pool(reference, tmp_path, capsys):
    en2de = os.path.join(reference["data"], "en2de.tsv")
    assert validate_main([en2de, "--audio-root", reference["root"]]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "rows 1 ok 1 bad 0"
    assert validate_main([en2de]) == 1
    assert "task.audio_root" in capsys.readouterr().out
    path, _ = librispeech(tmp_path)
    assert validate_main([path, "--prompt-pool", "asr.unseen"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "rows 3 ok 3 bad 0"
    assert validate_main([path, "--format", "instruction"]) == 1
    assert "missing required column" in capsys.readouterr().out
