"""Toy stage 0's data for the stand-ins: frame labels, speaker changes, spans of words with their tags."""
import json
import random
from types import SimpleNamespace

import pytest
import torch

from wavllm_fairseq.toy import stage0


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
    assert stage0.text_span(tok, "red", random.Random(0))[1] == [()] * len(stage0.text_span(tok, "red", random.Random(0))[0])


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
