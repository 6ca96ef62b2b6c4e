"""The real CLIs on manifests in other formats: fairseq-hydra-train on wav2vec/HuBERT and speech_to_text manifests
beside instruction ones, fairseq-generate on the reference's test-set layout with --audio-root and without
--batch-size / --max-tokens, wavllm-score's fairseq WER against fairseq-generate's own."""
import os
import re
import subprocess

import numpy as np
import pytest
import soundfile as sf

from helpers import WORDS, make_corpus, tone
from wavllm_fairseq import WavLLM
from test_train_cli import ENV, ROOT, USER_DIR, tiny_overrides, train

pytestmark = pytest.mark.slow

REF_DATA = "SpeechT5/WavLLM/fairseq/examples/wavllm/test_data"
LIBRI = ["{split}/103/1240/103-1240-000{i}.flac", "{split}/1034/121119/1034-121119-000{i}.flac"]


def words(k: int) -> str:
    return " ".join(WORDS[(k + j) % len(WORDS)] for j in range(3))


def add_wav2vec(data, name: str, split: str, n: int, seed: int):
    """<data>/<name>.tsv + .wrd over <data>/LibriSpeech/<split>/..., as wav2vec_manifest.py / libri_labels.py."""
    audio = os.path.join(data, "LibriSpeech")
    rows, labels = [], []
    for i in range(n):
        rel = LIBRI[i % 2].format(split=split, i=i)
        os.makedirs(os.path.join(audio, os.path.dirname(rel)), exist_ok=True)
        wav = tone(0.9 + 0.1 * i, 220 + 30 * i, seed + i)
        sf.write(os.path.join(audio, rel), wav, 16000)
        rows.append(f"{rel}\t{len(wav)}")
        labels.append(words(seed + i))
    with open(os.path.join(data, name + ".tsv"), "w") as f:
        f.write(audio + "\n" + "\n".join(rows) + "\n")
    with open(os.path.join(data, name + ".wrd"), "w") as f:
        f.write("\n".join(labels) + "\n")


def add_s2t(data, name: str, n: int, seed: int):
    """<data>/<name>.tsv in fairseq's speech_to_text layout (prep_librispeech_data.py columns, wav paths)."""
    os.makedirs(os.path.join(data, "s2t_wav"), exist_ok=True)
    lines = ["id\taudio\tn_frames\ttgt_text\tspeaker"]
    for i in range(n):
        wav = tone(0.8 + 0.1 * i, 260 + 25 * i, seed + i)
        sf.write(os.path.join(data, "s2t_wav", f"{name}{i}.wav"), wav, 16000)
        lines.append(f"{name}-{i}\ts2t_wav/{name}{i}.wav\t{len(wav)}\t{words(seed + i)}\tspk{i % 2}")
    with open(os.path.join(data, name + ".tsv"), "w") as f:
        f.write("\n".join(lines) + "\n")


def add_reference(root):
    """The reference's en2de.tsv and gaokao.tsv layouts (column order, path style, placeholders), own content."""
    test_data = os.path.join(root, REF_DATA)
    os.makedirs(os.path.join(test_data, "audio"))
    os.makedirs(os.path.join(root, "gaokao_audio"))
    sf.write(os.path.join(test_data, "audio", "st.flac"), tone(1.5, 300, 7), 16000)  # 24000 samples > 12000
    with open(os.path.join(test_data, "en2de.tsv"), "w") as f:
        f.write("id\taudio\tn_frames\ttgt_text\tprompt\twith_speech\n"
                f"0\t{REF_DATA}/audio/st.flac\t34560\tdie katze\tTranslate the audio clip into German.\tTrue\n")
    lines = ["id\taudio\tn_frames\tprompt\ttgt_text\twith_speech"]
    for i in (1, 10):
        sf.write(os.path.join(root, "gaokao_audio", f"short_conv_{i}.wav"), tone(1.0, 280 + i, i), 16000)
        lines.append(f"short_conv_{i}\tgaokao_audio/short_conv_{i}.wav\t111111\tWhat is said? A. red; B. blue.\t"
                     f"A\tTrue")
    with open(os.path.join(test_data, "gaokao.tsv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return test_data


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("formats")
    corpus = make_corpus(str(work / "corpus"), n_train=4, n_test=2)
    data = os.path.dirname(corpus["train_asr"])
    add_wav2vec(data, "train_w2v", "train-clean-100", 4, 10)
    add_wav2vec(data, "test_w2v", "test-clean", 3, 50)
    add_s2t(data, "train_s2t", 4, 20)
    add_s2t(data, "test_s2t", 2, 60)
    ref_root = str(work / "ref_root")
    ref_data = add_reference(ref_root)
    save = work / "stage1"
    log = train(1, tiny_overrides(corpus, save, 4, ["task.train_manifests='train_asr,train_it,train_w2v,train_s2t'",
                                                    "task.train_weights='1,1,1,1'"]), work / "stage1.log")
    return dict(corpus=corpus, data=data, ref_root=ref_root, ref_data=ref_data, log=log,
                ckpt=str(save / "checkpoint_last.pt"), work=str(work))


def generate(runs, data, subset, extra=(), expect_ok=True):
    cmd = ["fairseq-generate", data, "--user-dir", USER_DIR, "--task", "wavllm_instruction", "--tokenizer-dir",
           runs["corpus"]["tok"], "--gen-subset", subset, "--path", runs["ckpt"], "--max-len-b", "6", "--beam", "1",
           "--cpu", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    log = out.stdout + out.stderr
    assert (out.returncode == 0) == expect_ok, log[-3000:]
    return log


def score(manifest, log, tmp):
    with open(tmp, "w") as f:
        f.write(log)
    out = subprocess.run(["wavllm-score", "--manifest", manifest, "--hypotheses", tmp], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_training_reads_wav2vec_and_s2t_manifests_beside_instruction_ones(runs):
    log = runs["log"]
    assert "train_w2v.tsv: 4 rows (read as a wav2vec/HuBERT manifest (transcripts from" in log, log[-3000:]
    assert "train_s2t.tsv: 4 rows (read as a speech_to_text TSV" in log
    assert os.path.isfile(runs["ckpt"])


def test_reference_layout_decodes_with_audio_root_and_without_batch_size(runs):
    log = generate(runs, runs["ref_data"], "en2de", ["--audio-root", runs["ref_root"]])  # neither flag given
    assert "max_tokens=12000 (fairseq-generate's value" in log and "batching by 480000" in log, log[-3000:]
    assert len(re.findall(r"^H-0\t", log, re.M)) == 1
    scores = score(os.path.join(runs["ref_data"], "en2de.tsv"), log, os.path.join(runs["work"], "en2de.txt"))
    assert re.search(r"^st bleu [\d.]+$", scores, re.M) and "st n 1" in scores  # en2de is scored as ST
    # the Python API resolves the same relative path against its audio_root, and answers as fairseq-generate does
    cli = re.search(r"^D-0\t[^\t]*\t(.*)$", log, re.M)[1]
    api = WavLLM.from_pretrained(runs["ckpt"], tokenizer_dir=runs["corpus"]["tok"], audio_root=runs["ref_root"])
    assert api.generate([f"{REF_DATA}/audio/st.flac"], ["Translate the audio clip into German."],
                        max_len_b=6)[0].strip() == cli.strip()
    log = generate(runs, runs["ref_data"], "gaokao", ["--audio-root", runs["ref_root"], "--batch-size", "2"])
    assert sorted(re.findall(r"^H-(\d+)\t", log, re.M)) == ["0", "1"]
    # without it, audio paths start from the manifest's folder: the error names the file and the option
    log = generate(runs, runs["ref_data"], "en2de", expect_ok=False)
    assert "en2de.tsv:2: id=0: audio" in log and "file not found" in log and "task.audio_root" in log, log[-3000:]


def test_wav2vec_test_set_decodes_and_fairseq_wer_matches_fairseq_generate(runs):
    log = generate(runs, runs["data"], "test_w2v", ["--batch-size", "2", "--scoring", "wer"])
    assert len(re.findall(r"^H-\d+\t", log, re.M)) == 3
    fairseq_wer = float(re.search(r"Generate test_w2v with beam=1: WER: ([\d.]+)", log)[1])
    scores = score(os.path.join(runs["data"], "test_w2v.tsv"), log, os.path.join(runs["work"], "w2v.txt"))
    ours = float(re.search(r"^asr wer_fairseq ([\d.]+)$", scores, re.M)[1])
    assert ours == pytest.approx(fairseq_wer, abs=0.006), scores
    assert re.search(r"^asr wer_whisper [\d.]+$", scores, re.M) and "WITHOUT its spelling map" in scores
    log = generate(runs, runs["data"], "test_w2v", ["--max-tokens", "1000"], expect_ok=False)
    assert "test_w2v.tsv:" in log and "dataset.max_tokens is 1000" in log and "--batch-size" in log, log[-3000:]


def test_s2t_test_set_decodes_with_prompts_from_the_named_pool(runs):
    log = generate(runs, runs["data"], "test_s2t", ["--batch-size", "2", "--prompt-pool", "asr.unseen"])
    assert len(re.findall(r"^H-\d+\t", log, re.M)) == 2, log[-3000:]
    assert "read as a speech_to_text TSV (prompt pool asr.unseen)" in log
    assert np.isfinite([float(s) for s in re.findall(r"^H-\d+\t([-\d.]+)\t", log, re.M)]).all()
