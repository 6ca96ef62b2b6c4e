"""Resampling to 16 kHz (data/resample.py): soxr (the default) is close to the reference's SoX ``rate`` (the
reference resamples through fairseq's get_waveform, torchaudio.sox_effects ``rate 16000``), lengths follow
one formula per method, and ``poly`` (the toy corpus's) is scipy's resample_poly exactly."""
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from wavllm_fairseq.data.resample import RESAMPLERS, num_frames_16k, resample_to_16k


def speech_like(sr: int, n: int, seed: int = 0) -> np.ndarray:
    """A gliding harmonic tone with an envelope and noise: energy up to and past the 8 kHz band edge."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    f0 = 120 + 80 * t
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = sum(np.sin(k * phase) / k for k in range(1, 40))
    x = 0.3 * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) * x + 0.02 * rng.standard_normal(n)
    return (x / np.abs(x).max() * 0.8).astype(np.float32)


def test_soxr_is_the_closest_to_sox_rate(tmp_path):
    """The SoX program runs the same libsox ``rate`` effect (default: high quality, linear phase) as the
    reference's torchaudio. sox is a measuring tool here, not installed by install.sh: skipped without it."""
    sox = shutil.which("sox")
    if sox is None:
        pytest.skip("the sox program is not installed (apt-get install sox)")
    x = speech_like(44100, 44100 + 417)
    sf.write(tmp_path / "in.wav", x, 44100, subtype="PCM_16")
    subprocess.run([sox, "-D", str(tmp_path / "in.wav"), "-e", "floating-point", "-b", "32",
                    str(tmp_path / "out.wav"), "rate", "16000"], check=True)
    ref, sr = sf.read(tmp_path / "out.wav", dtype="float32")
    pcm, _ = sf.read(tmp_path / "in.wav", dtype="float32")  # the reference reads the 16-bit file as float
    assert sr == 16000
    rel = {}
    for method in RESAMPLERS:
        y = resample_to_16k(pcm, 44100, method)
        n = min(len(y), len(ref))
        rel[method] = float(np.sqrt(np.mean((y[:n] - ref[:n]) ** 2) / np.mean(ref[:n] ** 2)))
    assert len(resample_to_16k(pcm, 44100)) == len(ref) == num_frames_16k(len(pcm), 44100)
    assert rel["soxr"] < 1e-3 and rel["poly"] > 10 * rel["soxr"], rel


@pytest.mark.parametrize("method", RESAMPLERS)
@pytest.mark.parametrize("sr", [8000, 11025, 22050, 24000, 32000, 44100, 48000])
def test_the_length_formula_is_the_resamplers(method, sr):
    for n in (1, 2, 3, 441, 1000, 4411, 44101):
        assert len(resample_to_16k(np.zeros(n, np.float32), sr, method)) == num_frames_16k(n, sr, method), n


def test_lengths_round_as_sox_does():
    # 759791 samples at 44.1 kHz = 275661.41 at 16 kHz: SoX and soxr give 275661, resample_poly rounds up
    assert num_frames_16k(759791, 44100) == 275661 and num_frames_16k(759791, 44100, "poly") == 275662
    assert num_frames_16k(3, 32000) == 2  # 1.5 rounds half up
    assert num_frames_16k(777, 16000) == 777 == num_frames_16k(777, 16000, "poly")


def test_poly_is_scipys_resample_poly_exactly_and_16k_is_untouched():
    x = speech_like(22050, 5000)
    assert np.array_equal(resample_to_16k(x, 22050, "poly"), resample_poly(x, 320, 441).astype(np.float32))
    assert np.array_equal(resample_to_16k(x, 16000), x)


def test_stereo_is_mixed_before_resampling_and_a_tone_survives():
    left, right = speech_like(48000, 4800, seed=1), speech_like(48000, 4800, seed=2)
    both = resample_to_16k(np.stack([left, right], 1), 48000)
    np.testing.assert_allclose(both, resample_to_16k((left + right) / 2, 48000), atol=1e-6)
    t = np.arange(8000)
    tone = resample_to_16k(np.sin(2 * np.pi * 300 * t / 8000).astype(np.float32), 8000)
    expected = np.sin(2 * np.pi * 300 * np.arange(16000) / 16000)
    assert np.abs(tone - expected)[400:-400].max() < 1e-3


def test_an_unknown_resampler_is_an_error():
    with pytest.raises(ValueError, match="resampler must be one of"):
        resample_to_16k(np.zeros(10, np.float32), 8000, "sinc")
