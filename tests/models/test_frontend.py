"""The front ends (frontend.py): Whisper's log-mel equals WhisperFeatureExtractor (one span, 30 s windows, each
chunk alone, as the reference feeds a long clip; frame counts; batch invariance); WavLM's input normalisation
equals Wav2Vec2FeatureExtractor's and follows the folder's preprocessor_config.json."""
import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from wavllm_fairseq.models.frontend import SAMPLE_RATE, whisper_log_mel


def sine(sr, n, freq=440.0, amp=0.5):
    return (amp * np.sin(2 * np.pi * freq * np.arange(n) / sr)).astype(np.float32)


def _clip(n, seed=0):
    """A tone over faint noise: more than 80 dB of range, so Whisper's (max - 8) floor is active."""
    rng = np.random.default_rng(seed)
    return (sine(SAMPLE_RATE, n, freq=330.0, amp=0.3) + 1e-5 * rng.standard_normal(n)).astype(np.float32)


@pytest.fixture(scope="module")
def extractor():
    return WhisperFeatureExtractor(feature_size=80)


def test_log_mel_matches_whisper_feature_extractor(extractor):
    n = 20800  # 1.3 s: 130 valid frames
    x = _clip(n)
    out = extractor(x, sampling_rate=SAMPLE_RATE, return_tensors="np", return_attention_mask=True)
    ref = out["input_features"][0]  # (80, 3000), 30 s pad
    mel, frames = whisper_log_mel(torch.from_numpy(x)[None], torch.tensor([n]))
    assert mel.shape == (1, 80, 130) and frames.tolist() == [130] == [int(out["attention_mask"].sum())]
    assert abs(float(mel.max() - mel.min()) - 2.0) < 1e-5  # the (max - 8) floor is exercised
    np.testing.assert_allclose(mel[0].numpy(), ref[:, :130], atol=1e-5)
    window, _ = whisper_log_mel(torch.from_numpy(x)[None], torch.tensor([n]), window_frames=3000)
    assert window.shape == (1, 80, 3000)
    np.testing.assert_allclose(window[0].numpy(), ref, atol=1e-5)  # padding frames too


@pytest.mark.parametrize("n", [480000, 480160, 600001, 960000])
def test_log_mel_windows_are_the_extractor_on_each_30s_chunk(extractor, n):
    """A clip over 30 s, as the reference feeds it (speechllm_dataset.py process_audio_source: 30 s
    chunks, each through the feature extractor alone): every window has its own peak and reflect
    padding at its own edges; the valid frames are the masks' sum, ceil(n / 160)."""
    x = _clip(n, seed=3) * np.linspace(0.2, 1.0, n, dtype=np.float32)  # louder later: per-window peaks differ
    chunks = [x[i: i + 480000] for i in range(0, n, 480000)]
    outs = [extractor(c, sampling_rate=SAMPLE_RATE, return_tensors="np", return_attention_mask=True) for c in chunks]
    ref = np.concatenate([o["input_features"][0] for o in outs], axis=1)
    mel, frames = whisper_log_mel(torch.from_numpy(x)[None], torch.tensor([n]), window_frames=3000)
    assert mel.shape == (1, 80, 3000 * len(chunks))
    assert int(frames[0]) == sum(int(o["attention_mask"].sum()) for o in outs) == -(-n // 160)
    np.testing.assert_allclose(mel[0].numpy(), ref, atol=1e-5)


@pytest.mark.parametrize("n", [999, 12345, 16000, 16159])
def test_log_mel_frame_count(extractor, n):
    # ceil(T / hop) frames, the extractor's attention mask when it pads to 30 s (the reference's length)
    x = _clip(n)
    out = extractor(x, sampling_rate=SAMPLE_RATE, return_tensors="np", return_attention_mask=True)
    mel, frames = whisper_log_mel(torch.from_numpy(x)[None], torch.tensor([n]))
    assert mel.shape[-1] == int(out["attention_mask"].sum()) == -(-n // 160) == int(frames[0])
    np.testing.assert_allclose(mel[0].numpy(), out["input_features"][0, :, : mel.shape[-1]], atol=1e-5)


def test_log_mel_batch_invariance():
    # 4810 samples: 30 frames, the last window reaches 30 samples past the end of the clip
    a, b = _clip(4810, seed=1), _clip(24000, seed=2) * 3.0  # b is louder: its max must not leak into a
    batch = torch.zeros(2, 24000)
    batch[0, :4810] = torch.from_numpy(a)
    batch[1] = torch.from_numpy(b)
    batch_dirty = batch.clone()
    batch_dirty[0, 4810:] = 0.9  # garbage past the length is ignored
    lengths = torch.tensor([4810, 24000])
    alone, _ = whisper_log_mel(torch.from_numpy(a)[None], torch.tensor([4810]))
    assert alone.shape == (1, 80, 31)
    for wav in (batch, batch_dirty):
        mel, frames = whisper_log_mel(wav, lengths)
        assert mel.shape == (2, 80, 150) and frames.tolist() == [31, 150]
        torch.testing.assert_close(mel[0, :, :31], alone[0], atol=1e-5, rtol=0)
        windowed, _ = whisper_log_mel(wav, lengths, window_frames=100)
        alone_w, _ = whisper_log_mel(torch.from_numpy(a)[None], torch.tensor([4810]), window_frames=100)
        torch.testing.assert_close(windowed[0, :, :100], alone_w[0], atol=1e-5, rtol=0)
    # per-utterance floor at the utterance's own max - 8 (2.0 after the / 4), and it is reached
    mel, _ = whisper_log_mel(batch, lengths)
    assert abs(float(mel[0, :, :30].max() - mel[0, :, :30].min()) - 2.0) < 1e-5
    assert float(mel[1].max() - mel[0, :, :30].max()) > 0.1


# ----------------------------------------------------------------------------- WavLM's input normalisation
def test_zero_mean_unit_var_equals_the_wav2vec2_feature_extractor_per_clip():
    """Each clip of a padded batch is what Wav2Vec2FeatureExtractor(do_normalize=True) makes of it alone."""
    from transformers import Wav2Vec2FeatureExtractor

    from wavllm_fairseq.models.frontend import zero_mean_unit_var

    extractor = Wav2Vec2FeatureExtractor(do_normalize=True)
    clips = [0.3 + _clip(9000, seed=1), 0.05 * _clip(4000, seed=2)]  # an offset, a quiet clip
    wav = torch.zeros(2, 9000)
    for b, c in enumerate(clips):
        wav[b, : len(c)] = torch.from_numpy(c)
    out = zero_mean_unit_var(wav, torch.tensor([9000, 4000]))
    for b, c in enumerate(clips):
        ref = extractor(c, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_values"][0]
        np.testing.assert_allclose(out[b, : len(c)].numpy(), ref, atol=2e-6, rtol=1e-5)
    assert not out[1, 4000:].any() and out.dtype == wav.dtype


@pytest.mark.parametrize("content, expected", [
    (None, False),  # no preprocessor_config.json: a folder written by save_pretrained alone (the toy's stand-in)
    ({"do_normalize": False, "sampling_rate": 16000}, False),
    ({"do_normalize": True, "feature_extractor_type": "Wav2Vec2FeatureExtractor"}, True),
    ({"feature_size": 1}, True),  # no key: Wav2Vec2FeatureExtractor's default, as AutoFeatureExtractor reads it
])
def test_the_folders_preprocessor_config_decides(tmp_path, content, expected):
    import json

    from wavllm_fairseq.models.frontend import wavlm_normalizes_input

    if content is not None:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(content))
    assert wavlm_normalizes_input(str(tmp_path)) is expected


@pytest.mark.parametrize("text, message", [
    ("{not json", "unreadable feature extractor config"),
    ('{"do_normalize": "yes"}', "key do_normalize must be true or false"),
    ('{"sampling_rate": 8000}', "key sampling_rate is 8000"),
])
def test_a_bad_preprocessor_config_is_an_error_naming_file_and_key(tmp_path, text, message):
    from wavllm_fairseq.errors import CheckpointError
    from wavllm_fairseq.models.frontend import wavlm_normalizes_input

    (tmp_path / "preprocessor_config.json").write_text(text)
    with pytest.raises(CheckpointError, match=message) as err:
        wavlm_normalizes_input(str(tmp_path))
    assert err.value.file == str(tmp_path / "preprocessor_config.json")
