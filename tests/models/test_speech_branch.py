"""The speech branch (encoders.py, adapters.py, speech.py) on wavllm_tiny: 80 ms strides and the length
formulas, long clips window by window, a layer-norm WavLM batch equal to each clip alone."""
import pytest
import torch
from transformers import WavLMConfig, WavLMModel

from tiny_wavllm import tiny
from wavllm_fairseq.models.adapters import ModalityAdapter, conv_out_len
from wavllm_fairseq.models.encoders import WavLMAcousticEncoder


@pytest.mark.parametrize("n_samples", [1, 319, 320, 1600, 16000, 16001, 23457, 48000])
def test_speech_frames_80ms_stride(n_samples):
    model = tiny().eval()
    with torch.no_grad():
        x, lengths = model.encode_speech(0.1 * torch.randn(1, n_samples), torch.tensor([n_samples]))
    predicted = model.speech_frames(torch.tensor([n_samples]))
    assert int(lengths[0]) == int(predicted[0]) == x.shape[1]
    # 80 ms = 1280 samples per frame (both branches at 20 ms, two stride-2 convs)
    assert abs(int(lengths[0]) - n_samples / 1280) <= 1.5
    assert x.shape[2] == model.llm_dim


def test_conv_length_formula_matches_convolution():
    adapter = ModalityAdapter(8, 8, 8, 4, 6)
    for n in [1, 2, 3, 4, 5, 17, 64, 101]:
        y, lengths = adapter(torch.randn(1, n, 8), torch.tensor([n]))
        assert y.shape[1] == int(lengths[0]) == int(conv_out_len(conv_out_len(torch.tensor(n))))


def test_long_audio_is_chunked_not_truncated():
    model = tiny().eval()
    window_samples = model.whisper.window * model.whisper.hop_length  # 2 s for wavllm_tiny
    n = int(2.6 * window_samples)
    with torch.no_grad():
        sem, lengths = model.whisper(0.1 * torch.randn(1, n), torch.tensor([n]))
    assert sem.shape[1] == int(lengths[0]) == (n // 160 + 1) // 2


def test_a_clip_longer_than_a_whisper_window_is_adapted_window_by_window():
    """The reference encodes a long clip 30 s window by window, so the semantic adapter's convolutions
    see zeros at each window's edge (wavllm_tiny's window: 100 Whisper frames = 2 s). Lengths are the
    whole clip's; a batch equals each clip alone."""
    model = tiny(seed=2).eval()
    W = model.whisper.encoder.config.max_source_positions
    n = 5 * 16000 + 123  # 3 windows, the last one partial
    audio = 0.1 * torch.randn(2, n, generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([n, 16000])
    with torch.no_grad():
        sem, sem_len = model.whisper(audio, lengths)
        got, got_len = model._semantic_per_window(sem, sem_len)
        assert got_len.tolist() == model.semantic_adapter.output_lengths(sem_len).tolist()
        for k in range(3):  # window k of clip 0, alone
            frames = sem[:1, k * W: (k + 1) * W]
            valid = (sem_len[:1] - k * W).clamp(0, W)
            alone, alone_len = model.semantic_adapter(frames, valid)
            step = model.semantic_adapter.output_lengths(torch.tensor([W]))[0]
            m = int(alone_len)
            torch.testing.assert_close(got[0, k * step: k * step + m], alone[0, :m])
        whole, _ = model.semantic_adapter(sem[:1], sem_len[:1])  # across the join the two differ
        assert not torch.allclose(whole[0, step - 1: step + 1], got[0, step - 1: step + 1])
        short, short_len = model.semantic_adapter(sem[1:2, : int(sem_len[1])], sem_len[1:2])
        torch.testing.assert_close(got[1, : int(short_len)], short[0, : int(short_len)])


def reference_semantic_windows(adapter, sem, W):
    """The reference's semantic branch on a clip's stacked windows, written out: every window's Whisper
    output cut to the longest valid length among them (a full window), the subsampler's two Conv1d + GLU with
    no masking, the bottleneck x + LayerNorm(Up(GELU(Down(x)))) and the projection; windows concatenated."""
    out = []
    for k in range(sem.shape[1] // W):
        x = sem[:, k * W: (k + 1) * W].transpose(1, 2)
        for conv in adapter.subsampler.conv_layers:
            x = torch.nn.functional.glu(conv(x), dim=1)
        out.append(adapter.out_proj(adapter.bottleneck(x.transpose(1, 2))))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("n_samples, last_window, tail_differs", [(41500, 30, True), (41800, 31, True),
                                                                 (42080, 32, False)],
                         ids=["last window 30 frames (2 mod 4)", "31 (3 mod 4)", "32 (0 mod 4)"])
def test_a_long_clips_last_window_is_read_whole_as_the_reference_reads_it(n_samples, last_window, tail_differs):
    """Over one Whisper window (wavllm_tiny: 100 frames = 2 s) the reference's subsampler reads the last
    window's Whisper outputs of the mel padding, so the last speech frame differs from zero padding when
    that window's valid length is 2 or 3 mod 4; the model computes it as the reference does."""
    model = tiny(seed=3).eval()
    W = model.whisper.encoder.config.max_source_positions
    audio = 0.1 * torch.randn(1, n_samples, generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([n_samples])
    with torch.no_grad():
        whole, sem_len = model.whisper(audio, lengths, whole_windows=True)
        assert whole.shape[1] == 2 * W == int(model.whisper.frames_read(lengths)[0])
        assert int(sem_len[0]) - W == last_window
        valid, _ = model.whisper(audio, lengths)
        assert torch.equal(whole[:, : valid.shape[1]], valid)
        expected = reference_semantic_windows(model.semantic_adapter, whole, W)
        ac, ac_len = model.acoustic_adapter(*model.wavlm(audio, lengths))
        n = int(ac_len[0])  # the fused length: the acoustic stream is the shorter, as in the reference
        got, got_len = model._semantic_per_window(whole, sem_len)
        assert int(got_len[0]) >= n
        torch.testing.assert_close(got[:, :n], expected[:, :n], rtol=1e-5, atol=1e-6)
        zero_tail, _ = model._semantic_per_window(valid, sem_len)  # the last window zero-padded
        assert torch.equal(got[:, : n - 1], zero_tail[:, : n - 1])
        assert (not torch.allclose(got[:, n - 1], zero_tail[:, n - 1])) == tail_differs
        speech, speech_len = model.encode_speech(audio, lengths)
        fused = model.projector(torch.cat([expected[:, :n], ac[:, :n]], dim=-1))
        assert int(speech_len[0]) == n
        torch.testing.assert_close(speech, fused, rtol=1e-5, atol=1e-6)


def test_clips_within_one_window_read_only_their_valid_frames():
    model = tiny(seed=3).eval()
    audio = 0.1 * torch.randn(2, 30000, generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([30000, 20000])
    with torch.no_grad():
        whole, whole_len = model.whisper(audio, lengths, whole_windows=True)
        valid, valid_len = model.whisper(audio, lengths)
    assert torch.equal(whole, valid) and torch.equal(whole_len, valid_len)
    assert torch.equal(model.whisper.frames_read(lengths), valid_len)


def test_layer_norm_wavlm_runs_a_padded_batch_as_each_clip_alone():
    """WavLM with a per-frame LayerNorm extractor (the toy stand-in's layout) runs unequal clips as one
    masked batch; each clip's hidden states equal its own run and its padding frames are zero."""
    torch.manual_seed(0)
    cfg = WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      conv_dim=(32,) * 7, conv_bias=True, feat_extract_norm="layer", num_conv_pos_embeddings=16,
                      num_conv_pos_embedding_groups=4, num_buckets=32, max_bucket_distance=64)
    enc = WavLMAcousticEncoder(WavLMModel(cfg).eval())
    wav, lengths = torch.randn(3, 16000), torch.tensor([16000, 9000, 5000])
    with torch.no_grad():
        hidden, out_len = enc(wav, lengths)  # (L+1, B, T, C)
        for b in range(3):
            alone, alone_len = enc(wav[b: b + 1, : lengths[b]], lengths[b: b + 1])
            n = alone.shape[2]
            assert int(out_len[b]) == int(alone_len[0]) == n
            assert torch.allclose(hidden[:, b, :n], alone[:, 0], atol=1e-4)
            assert not hidden[:, b, n:].any()

