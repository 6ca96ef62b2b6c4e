"""Waveforms at any rate and channel count -> 16 kHz mono float32 (the rate the model's encoders take).

Channels are averaged, then the rate is converted. Resamplers (``method``):

* ``soxr`` (default): the SoX Resampler library (derived from SoX's ``rate`` effect) at its high quality
  (``HQ``: 20-bit precision). The reference reads audio through fairseq's ``get_waveform``, whose
  ``torchaudio.sox_effects`` ``rate 16000`` runs SoX's ``rate`` at its default quality (high); soxr HQ is
  the closest resampler to it that was measured (examples/wavllm/toy/RESULTS.md, "Resampling"). Output
  length ``floor(n * 16000 / sr + 1/2)``, SoX's.
* ``poly``: ``scipy.signal.resample_poly`` with the gcd-reduced ratio; output length
  ``ceil(n * up / down)``. What the toy corpus was generated with, and keeps.
"""
import math
from typing import Tuple

import numpy as np
from scipy.signal import resample_poly

try:  # a dependency (setup.py); a machine given only wheels may lack it: 16 kHz audio never needs it
    import soxr
except ImportError:  # pragma: no cover - exercised only where soxr is absent
    soxr = None

from ..models.frontend import SAMPLE_RATE

RESAMPLERS = ("soxr", "poly")
DEFAULT_RESAMPLER = "soxr"


def _ratio(sr: int) -> Tuple[int, int]:
    g = math.gcd(SAMPLE_RATE, sr)
    return SAMPLE_RATE // g, sr // g


def _check(method: str) -> None:
    if method not in RESAMPLERS:
        raise ValueError(f"resampler must be one of {RESAMPLERS}, got {method!r}")


def num_frames_16k(n: int, sr: int, method: str = DEFAULT_RESAMPLER) -> int:
    """Length of ``n`` samples at ``sr`` after :func:`resample_to_16k`.

    Args:
        n (int): samples at ``sr``.
        sr (int): the sample rate in Hz.
        method (str): one of :data:`RESAMPLERS`.

    Returns:
        int: samples at 16 kHz: ``floor(n * 16000 / sr + 1/2)`` (soxr), ``ceil(n * up / down)`` (poly).
    """
    _check(method)
    if sr == SAMPLE_RATE:
        return n
    if method == "soxr":
        return (2 * n * SAMPLE_RATE + sr) // (2 * sr)
    up, down = _ratio(sr)
    return -(-n * up // down)


def resample_to_16k(wav: np.ndarray, sr: int, method: str = DEFAULT_RESAMPLER) -> np.ndarray:
    """Mix a waveform down to mono (channel mean) and resample it to 16 kHz.

    Args:
        wav (np.ndarray): samples with shape (T,) or (T, C).
        sr (int): its sample rate in Hz.
        method (str): one of :data:`RESAMPLERS` (see the module docstring).

    Returns:
        np.ndarray: float32 with shape (T16,), T16 = ``num_frames_16k(T, sr, method)``.
    """
    _check(method)
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim == 2:
        wav = wav.mean(axis=1)  # (T, C) -> (T,)
    if wav.ndim != 1:
        raise ValueError(f"audio array must be (T,) or (T, channels), got shape {wav.shape}")
    if sr != SAMPLE_RATE and len(wav):
        n16 = num_frames_16k(len(wav), int(sr), method)
        if method == "soxr":
            if soxr is None:
                raise RuntimeError(f"resampling {sr} Hz audio needs the soxr package (a dependency of this plugin, "
                                   "setup.py): pip install soxr")
            wav = soxr.resample(wav, int(sr), SAMPLE_RATE, quality="HQ")
            # the library's own length is the formula's; kept to it whatever a version rounds
            wav = np.pad(wav[:n16], (0, max(0, n16 - len(wav))))
        else:
            up, down = _ratio(int(sr))
            wav = resample_poly(wav, up, down)
    return np.ascontiguousarray(wav, dtype=np.float32)
