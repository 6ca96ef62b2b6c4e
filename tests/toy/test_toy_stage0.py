"""Toy stage 0: the stand-ins' data (frame labels, speaker changes, spans of words with their tags), the cache
key, the shared training loop, the held-out WER."""
import json
import os
import random
import shutil
from types import SimpleNamespace

import editdistance
import pytest
import torch

from wavllm_fairseq.evaluation import metrics
from wavllm_fairseq.toy import stage0, tables
from wavllm_fairseq.toy.stage0 import whisper
from wavllm_fairseq.toy.stage0.loop import Batches, schedule, train_steps


class Tok:
    """A word-level stand-in for the sentencepiece tokenizer: one id per word."""

    def __init__(self):
        self.ids = {}

    def encode(self, text):
        return [self.ids.setdefault(w, 10 + len(self.ids)) for w in text.split()]


def row(**extra):
    return SimpleNamespace(id="r1", n_frames=8000, extra=extra)


def test_second_utterance_starts_after_the_widest_pause():
    assert stage0.second_utterance([[0, 100], [100, 250], [4000, 4200], [4200, 4500]]) == 2
    with pytest.raises(ValueError):
        stage0.second_utterance([[0, 100]])


def test_word_tags_name_gender_style_and_a_second_speaker():
    tok = Tok()
    one = row(transcript="the cat sees", gender="female", style="sad", n_speakers="1",
              word_samples="[[0,10],[10,20],[20,30]]")
    tags = stage0.word_tags(tok, one)
    assert tags == [(tok.encode("female")[0], tok.encode("sad")[0])] * 3
    two = row(transcript="a dog runs the cow", gender="male", style="neutral", n_speakers="2",
              word_samples=json.dumps([[0, 10], [10, 20], [20, 30], [5000, 5100], [5100, 5200]]))
    tags = stage0.word_tags(tok, two)
    male, neutral, other = (tok.encode(w)[0] for w in ("male", "neutral", stage0.SECOND_SPEAKER_TAG))
    assert tags[:3] == [(male, neutral)] * 3 and tags[3:] == [(other, neutral)] * 2


def test_text_span_repeats_each_word_and_carries_its_tags():
    tok = Tok()
    pieces, tags = stage0.text_span(tok, "red cat", random.Random(3), [(1,), (2, 3)])
    assert len(pieces) == len(tags) and set(pieces) == set(tok.encode("red cat"))
    red, cat = tok.encode("red cat")
    n_red = pieces.count(red)
    assert pieces == [red] * n_red + [cat] * (len(pieces) - n_red)
    assert all(1 <= c <= max(stage0.SPAN_REPEATS) for c in (n_red, len(pieces) - n_red))
    assert tags == [(1,)] * n_red + [(2, 3)] * (len(pieces) - n_red)
    assert (stage0.text_span(tok, "red", random.Random(0))[1]
            == [()] * len(stage0.text_span(tok, "red", random.Random(0))[0]))


def test_embeddings_add_the_tags_to_their_positions_and_pad_with_a_mask():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(20, 4)
    model = SimpleNamespace(get_input_embeddings=lambda: emb)
    batch = [([5, 6, 7], [(), (11, 12), ()]), ([8], [(13,)])]
    x, ids, mask = stage0.embed_with_tags(model, batch)
    w = emb.weight.detach()
    assert ids.tolist() == [[5, 6, 7], [8, -100, -100]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    k = stage0.TAG_SCALE
    assert torch.allclose(x[0, 0], w[5]) and torch.allclose(x[0, 1], w[6] + k * (w[11] + w[12]))
    assert torch.allclose(x[1, 0], w[8] + k * w[13])


def test_speaker_change_labels_mark_the_second_voice_only():
    spans = json.dumps([[0, 3000], [3000, 6000], [10800, 13000], [13000, 16000]])
    different = row(label="no", word_samples=spans)
    labels = stage0.speaker_change_labels(different, 50, 320)
    assert labels[: 10800 // 320].sum() == 0 and labels[10800 // 320:].all()
    assert stage0.speaker_change_labels(row(label="yes", word_samples=spans), 50, 320).sum() == 0


# ------------------------------------------------------------------ cache key
@pytest.fixture
def toy_corpus(tmp_path):
    """The files of a corpus that the key reads (their content does not matter here)."""
    d = tmp_path / "corpus"
    d.mkdir()
    for name in ("train_asr.tsv", "lm_text.txt", "valid_asr.tsv", "corpus.json"):
        (d / name).write_text(f"{name}\n")
    return str(d)


def test_the_cache_key_covers_the_source_of_stage_0():
    files = stage0.code_files()
    here = os.path.dirname(stage0.__file__)
    assert {os.path.join(here, f) for f in os.listdir(here) if f.endswith(".py")} <= set(files)
    names = {os.path.relpath(f, tables.SOURCE_ROOT).replace(os.sep, "/") for f in files}
    assert {"wavllm_fairseq/toy/tables.py", "wavllm_fairseq/toy/data/lexicon.json",
            "wavllm_fairseq/data/prompts/asr.seen.txt", "wavllm_fairseq/models/encoders.py",
            "wavllm_fairseq/data/prompt_template.py", "wavllm_fairseq/data/tokenizer.py"} <= names
    assert all(os.path.isfile(f) for f in files)


def test_a_changed_source_byte_setting_seed_or_corpus_file_changes_the_cache_key(tmp_path, toy_corpus, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    files = []
    for f in stage0.code_files():  # copies under their SOURCE_ROOT-relative names: the same key as the originals
        copy = src / os.path.relpath(f, tables.SOURCE_ROOT)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, copy)
        files.append(str(copy))
    key = stage0.fingerprint(toy_corpus, "small", 1)
    monkeypatch.setattr(tables, "SOURCE_ROOT", str(src))
    assert stage0.fingerprint(toy_corpus, "small", 1, files) == key  # the same bytes elsewhere: the same key

    loop = next(f for f in files if f.endswith(os.path.join("stage0", "loop.py")))
    data = bytearray(open(loop, "rb").read())
    data[-2] ^= 1  # one byte of the training loop
    open(loop, "wb").write(bytes(data))
    assert stage0.fingerprint(toy_corpus, "small", 1, files) != key
    data[-2] ^= 1
    open(loop, "wb").write(bytes(data))
    assert stage0.fingerprint(toy_corpus, "small", 1, files) == key

    assert stage0.fingerprint(toy_corpus, "small", 2, files) != key
    assert stage0.fingerprint(toy_corpus, "default", 1, files) != key
    monkeypatch.setitem(stage0.SETTINGS["small"], "llama", {**stage0.SETTINGS["small"]["llama"], "lr": 1e-3})
    assert stage0.fingerprint(toy_corpus, "small", 1, files) != key
    monkeypatch.undo()
    open(os.path.join(toy_corpus, "valid_asr.tsv"), "a").write("x\n")
    assert stage0.fingerprint(toy_corpus, "small", 1, files) != key


def test_a_manifest_derived_beside_the_corpus_keeps_the_key(toy_corpus):
    """Only the training manifests the corpus tool wrote (corpus.json's counts) are in the key: the pipeline's
    train_sqqa_llm.tsv, written after stage 0, must not retrain it on the next run."""
    with open(os.path.join(toy_corpus, "corpus.json"), "w") as f:
        json.dump({"counts": {"train_asr": 1, "valid_asr": 1}}, f)
    key = stage0.fingerprint(toy_corpus, "small", 1)
    open(os.path.join(toy_corpus, "train_sqqa_llm.tsv"), "w").write("derived\n")
    assert stage0.fingerprint(toy_corpus, "small", 1) == key
    open(os.path.join(toy_corpus, "train_asr.tsv"), "a").write("x\n")
    assert stage0.fingerprint(toy_corpus, "small", 1) != key


def test_a_missing_source_file_is_named(tmp_path, toy_corpus):
    with pytest.raises(FileNotFoundError, match="gone.py"):
        stage0.fingerprint(toy_corpus, "small", 1, [str(tmp_path / "gone.py")])


# ------------------------------------------------------------------ the shared training loop
def test_batches_take_every_item_once_per_pass_and_carry_the_rest_over():
    batches = Batches(random.Random(0), 5, 2)
    drawn = [batches() for _ in range(5)]  # 10 indices: two passes over the 5 items
    assert all(len(b) == 2 for b in drawn)
    flat = [i for b in drawn for i in b]
    assert sorted(flat[:5]) == sorted(flat[5:]) == list(range(5))
    assert flat[:5] != flat[5:]  # each pass is a fresh shuffle


def test_schedule_warms_up_then_decays_to_five_percent():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    lrs = []
    for step in range(100):
        schedule(opt, step, 100, 1.0, 10)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(0.91) and max(lrs) == lrs[9]
    assert lrs[-1] == pytest.approx(0.05) and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_train_steps_fits_a_model_and_leaves_it_in_eval_mode(capsys):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x = torch.randn(32, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    before = torch.nn.functional.mse_loss(model(x), y).item()
    train_steps("toy", model, model.parameters(), {"steps": 200, "lr": 0.1},
                lambda: torch.nn.functional.mse_loss(model(x), y), "mse")
    assert not model.training
    assert torch.nn.functional.mse_loss(model(x), y).item() < before / 10
    out = capsys.readouterr().out
    assert "[stage0] toy stand-in: step 100/200 mse" in out and "step 200/200" in out


# ------------------------------------------------------------------ held-out WER
def test_the_scorer_wer_counts_the_toy_transcripts_as_lower_cased_words():
    """The Whisper stand-in's WER is the scorer's: on the toy's texts (lower-case words, no punctuation)
    it is edit distance over ``text.lower().split()``, as the toy counted before."""
    rng = random.Random(0)
    sentences = [t for t, _ in tables.all_sentences()]
    refs = rng.sample(sentences, 50)
    hyps = []
    for r in refs:
        words = r.split()
        k = rng.randrange(len(words))
        hyps.append(" ".join(words[:k] + rng.sample(sentences, 1)[0].split()[:rng.randrange(3)] + words[k + 1:]))
    own = 100.0 * sum(editdistance.eval(r.lower().split(), h.lower().split()) for r, h in zip(refs, hyps)) / sum(
        len(r.split()) for r in refs)
    assert metrics.wer(refs, hyps) == own > 0
    assert whisper.wer is metrics.wer
