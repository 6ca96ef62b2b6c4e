"""CTC shrinking of the speech span (models/shrink.py, ``model.speech_shrink=ctc``): which frames are kept and
merged, the fallback for an all-blank clip, gradients, the model and criterion wiring, decoding, save/load."""
import pytest
import torch

from tests.decoding.test_generator import batch as gen_batch
from tests.decoding.test_generator import gen, row, tokens
from tests.models.tiny_wavllm import make_batch, tiny
from wavllm_fairseq.criterions.ctc_align import WavLLMCTCAlign
from wavllm_fairseq.models.shrink import CTCShrink
from wavllm_fairseq.models.trainability import trainable_groups

D = 4


def one_hot_frames(best, scale=5.0):
    """Frames whose CTC scores against the identity table pick ``best`` (0 = blank: every token scores 0)."""
    x = torch.zeros(len(best), D)
    for i, v in enumerate(best):
        if v:
            x[i, v - 1] = scale * (1 + i / 10)  # token v - 1 scores highest; frames differ in size
    return x


def shrink_module():
    m = CTCShrink(D)
    with torch.no_grad():
        m.blank_bias.fill_(1.0)  # the blank wins where every token scores <= 0
    return m


def test_keeps_token_frames_and_merges_runs_of_the_same_token_into_their_mean():
    table = torch.eye(D)
    rows = [[3, 3, 0, 4, 0, 3, 1], [0, 2, 2, 2, 0, 0, 0]]
    x = torch.stack([one_hot_frames(r) for r in rows])  # (2, 7, D)
    lengths = torch.tensor([7, 4])  # row 1's last three frames are padding
    out, n = shrink_module()(x, lengths, table)
    assert n.tolist() == [4, 1]
    assert out.shape == (2, 4, D)
    torch.testing.assert_close(out[0, 0], x[0, :2].mean(0))
    torch.testing.assert_close(out[0, 1:], x[0, [3, 5, 6]])
    torch.testing.assert_close(out[1, 0], x[1, 1:4].mean(0))
    assert torch.equal(out[1, 1:], torch.zeros(3, D))


def test_a_clip_heard_as_blank_only_keeps_its_least_blank_frame_and_an_empty_row_keeps_none():
    table = torch.eye(D)
    x = torch.full((3, 5, D), -1.0)
    x[0, 3, 2] = 0.5  # still blank (1.0 > 0.5) but the least blank of row 0
    x[1, 1, 0] = 0.8
    out, n = shrink_module()(x, torch.tensor([5, 3, 0]), table)
    assert n.tolist() == [1, 1, 0]
    torch.testing.assert_close(out[0, 0], x[0, 3])
    torch.testing.assert_close(out[1, 0], x[1, 1])


def test_ctc_tokens_reads_each_kept_frames_expected_token_embedding():
    table = torch.randn(D, D, generator=torch.Generator().manual_seed(0))
    x = torch.stack([one_hot_frames([3, 3, 0, 4, 0, 3, 1])]) @ torch.linalg.inv(table).t()  # scores as before
    x.requires_grad_(True)
    m = CTCShrink(D, tokens=True)
    with torch.no_grad():
        m.blank_bias.fill_(1.0)
    out, n = m(x, torch.tensor([7]), table)
    frames, _ = shrink_module()(x.detach(), torch.tensor([7]), table)
    assert n.tolist() == [4]  # the same positions as without tokens=True
    expected = torch.softmax(x.detach()[0] @ table.t(), dim=-1) @ table  # (7, D)
    torch.testing.assert_close(out[0, 0], expected[:2].mean(0))
    torch.testing.assert_close(out[0, 1:], expected[[3, 5, 6]])
    assert not torch.allclose(out, frames)
    out.sum().backward()
    assert x.grad[0, [2, 4]].abs().sum() == 0 and x.grad[0, 0].abs().sum() > 0  # through the scores


def test_gradients_reach_the_kept_frames_only():
    table = torch.eye(D)
    x = one_hot_frames([2, 0, 2, 2, 0]).unsqueeze(0).requires_grad_(True)
    out, n = shrink_module()(x, torch.tensor([5]), table)
    out.sum().backward()
    assert x.grad[0, [1, 4]].abs().sum() == 0
    torch.testing.assert_close(x.grad[0, 2], torch.full((D,), 0.5))  # the run of two: their mean
    torch.testing.assert_close(x.grad[0, 0], torch.ones(D))


def test_the_model_reads_the_shrunk_span_and_ctc_scores_every_frame_with_the_models_blank():
    model = tiny(speech_shrink="ctc").train()
    assert [n for n, _ in trainable_groups(model)["speech_shrink"]] == ["speech_shrink.blank",
                                                                        "speech_shrink.blank_bias"]
    with torch.no_grad():
        model.speech_shrink.blank_bias.fill_(-1e4)  # no frame is blank: runs of the same token still merge
    b = make_batch([16000, 8000, 0])
    full, full_n = model.encode_speech(b["audio"], b["audio_lengths"], shrink=False)
    short, short_n = model.encode_speech(b["audio"], b["audio_lengths"])
    assert bool((short_n <= full_n).all()) and bool((short_n[:2] >= 1).all()) and int(short_n[2]) == 0
    _, mask, post_start = model.assemble(b, left_pad=False)
    assert (post_start - b["pre_lengths"]).tolist() == short_n.tolist()
    crit = WavLLMCTCAlign(type("T", (), {"tokenizer": None, "llm_dim": model.llm_dim})())
    lprobs, frames, _ = crit.frame_log_probs(model, b)
    assert frames.tolist() == full_n.tolist()  # CTC scores all 80 ms frames
    lprobs[:, 0, 0].sum().backward()  # the blank's log-probabilities depend on the model's blank
    assert model.speech_shrink.blank.grad is not None and crit.blank.grad is None
    with pytest.raises(ValueError, match="norm_weight=0"):
        WavLLMCTCAlign(type("T", (), {"tokenizer": None, "llm_dim": model.llm_dim})(),
                       norm_weight=1.0).frame_log_probs(model, b)


def test_decoding_with_the_shrunk_span_cached_equals_uncached_and_batch_equals_alone():
    m = tiny(seed=3, speech_shrink="ctc")
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
        m.speech_shrink.blank.normal_(generator=torch.Generator().manual_seed(1))
    m.eval()
    s = gen_batch()
    cached = tokens(gen(m).generate([m], s))
    assert cached == tokens(gen(m, use_cache=False).generate([m], s))
    assert cached == [tokens(gen(m).generate([m], row(s, b)))[0] for b in range(3)]


def test_the_blank_is_saved_and_loaded_with_the_model(tmp_path):
    model = tiny(seed=1, speech_shrink="ctc").eval()
    with torch.no_grad():
        model.speech_shrink.blank.normal_()
    b = make_batch([16000, 8000, 0])
    ref, _, _ = model(**b)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    other = tiny(seed=2, speech_shrink="ctc").eval()
    other.load_state_dict(torch.load(tmp_path / "m.pt"))
    assert torch.equal(ref, other(**b)[0])
