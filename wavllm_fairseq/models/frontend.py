"""The speech encoders' front ends, as the folders' feature extractors make their inputs.

Whisper: 16 kHz waveform -> log-mel features, as ``WhisperFeatureExtractor`` makes them (the model takes
waveforms, as the reference's does; this is the first step of its semantic branch,
``encoders.WhisperSemanticEncoder``). Per frame: periodic hann window, centred STFT, power, slaney mel
filters, ``log10(max(x, 1e-10))``, floor at (peak - 8), ``(x + 4) / 4``.

WavLM: the waveform itself, or each clip normalised to zero mean and unit variance when the WavLM folder's
``preprocessor_config.json`` says ``do_normalize`` (``Wav2Vec2FeatureExtractor``'s option), as the reference
feeds WavLM through its folder's ``AutoFeatureExtractor``.
"""
import functools
import json
import os
from typing import Optional, Tuple

import numpy as np
import torch
from transformers import Wav2Vec2FeatureExtractor
from transformers.audio_utils import mel_filter_bank

from ..errors import CheckpointError

SAMPLE_RATE = 16000  # Hz: the waveform rate both speech encoders take
WHISPER_N_FFT = 400  # STFT window (25 ms)
WHISPER_HOP = 160  # samples per log-mel frame (10 ms)


@functools.lru_cache(maxsize=4)
def _mel_filters(n_mels: int, n_fft: int) -> np.ndarray:
    return mel_filter_bank(num_frequency_bins=1 + n_fft // 2, num_mel_filters=n_mels, min_frequency=0.0,
                           max_frequency=8000.0, sampling_rate=SAMPLE_RATE, norm="slaney",
                           mel_scale="slaney").astype(np.float32)  # (n_fft/2+1, n_mels)


def whisper_log_mel(wav: torch.Tensor, lengths: torch.Tensor, n_mels: int = 80, n_fft: int = WHISPER_N_FFT,
                    hop: int = WHISPER_HOP, window_frames: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Whisper's log-mel spectrogram for a right-padded batch, as ``WhisperFeatureExtractor`` makes it.

    Samples at and beyond ``lengths[b]`` are taken as zeros (the extractor zero-pads), so a clip's
    features do not depend on the batch it is in.

    * ``window_frames`` given (3000 = Whisper's 30 s): the clip is cut into consecutive windows of
      ``window_frames * hop`` samples, zero-padded to whole windows, and each window is what the
      extractor makes of that window alone -- as the reference feeds a clip over 30 s, one 30 s chunk
      at a time: its own peak, reflect padding at both edges of the window (real audio at the edge of a
      full window, zeros after a clip that ends inside it). ``F = n_windows * window_frames``.
    * ``window_frames=None``: one span; the peak is the utterance's own, the left edge is reflect-padded
      and the right edge sees zeros (what the extractor gives when it pads the clip to 30 s).
      ``F = ceil(T / hop)``.

    Args:
        wav (torch.Tensor): 16 kHz waveforms with shape (B, T), right-padded.
        lengths (torch.Tensor): valid samples of each clip, shape (B,).
        n_mels (int): mel bins (80 for Whisper up to large-v2).
        n_fft (int): STFT window in samples.
        hop (int): samples per frame.
        window_frames (Optional[int]): frames per window, or None for one span (see above).

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: ``mel`` with shape (B, n_mels, F), and the valid frame counts
        ``ceil(lengths / hop)`` with shape (B,): the extractor's attention mask (one entry per ``hop``
        samples of the clip, as the reference reads it).
    """
    wav = wav.float()
    B, T = wav.shape
    lengths = lengths.to(device=wav.device, dtype=torch.long)
    half = n_fft // 2
    if window_frames:
        W = window_frames * hop  # samples per window
        n_win = max(1, -(-T // W))
        keep = window_frames
    else:
        keep = max(1, -(-T // hop))
        W, n_win = keep * hop + half, 1  # zeros past the end: the right reflect only sees zeros
    wav = torch.nn.functional.pad(wav, (0, n_win * W - T)) if n_win * W > T else wav[:, : n_win * W]
    valid = torch.arange(n_win * W, device=wav.device)[None, :] < lengths[:, None]  # (B, n*W)
    x = torch.where(valid, wav, torch.zeros((), device=wav.device)).reshape(B * n_win, W)
    window = torch.hann_window(n_fft, device=wav.device)
    spec = torch.stft(x, n_fft, hop, window=window, center=True, pad_mode="reflect",
                      return_complex=True)  # (B*n, n_fft/2+1, 1 + W // hop)
    power = spec[..., :-1].abs() ** 2  # the extractor drops the last frame
    filters = torch.from_numpy(_mel_filters(n_mels, n_fft)).to(wav.device)
    log_spec = torch.clamp(filters.T @ power, min=1e-10).log10()  # (B*n, n_mels, W // hop)
    peak = log_spec.amax(dim=(1, 2), keepdim=True)  # per window (per utterance without windows)
    log_spec = (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0
    mel = log_spec[:, :, :keep].reshape(B, n_win, n_mels, keep).permute(0, 2, 1, 3).reshape(B, n_mels, n_win * keep)
    return mel, torch.div(lengths + hop - 1, hop, rounding_mode="floor")


NORM_EPS = 1e-7  # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm's variance floor


def zero_mean_unit_var(wav: torch.Tensor, wav_lengths: torch.Tensor) -> torch.Tensor:
    """Each clip scaled to zero mean and unit variance over its valid samples, ``(x - mean) / sqrt(var +
    1e-7)``, zeros past them: what ``Wav2Vec2FeatureExtractor(do_normalize=True)`` makes of a clip on its own
    before padding (the statistics are computed in float64).

    Args:
        wav (torch.Tensor): waveforms with shape (B, T), right-padded.
        wav_lengths (torch.Tensor): valid samples, shape (B,).

    Returns:
        torch.Tensor: the normalised waveforms with shape (B, T), in the dtype of ``wav``.
    """
    valid = torch.arange(wav.shape[1], device=wav.device)[None, :] < wav_lengths.to(wav.device)[:, None]
    x = torch.where(valid, wav.double(), torch.zeros((), dtype=torch.float64, device=wav.device))
    n = wav_lengths.to(wav.device).clamp(min=1).double()[:, None]
    mean = x.sum(1, keepdim=True) / n
    var = torch.where(valid, (x - mean) ** 2, torch.zeros_like(x)).sum(1, keepdim=True) / n
    out = torch.where(valid, (x - mean) / torch.sqrt(var + NORM_EPS), torch.zeros_like(x))
    return out.to(wav.dtype)


def wavlm_normalizes_input(path: str) -> bool:
    """Whether a WavLM folder's feature extractor normalises the waveform: the ``do_normalize`` of its
    ``preprocessor_config.json`` (``Wav2Vec2FeatureExtractor``'s default when the key is absent), False for a
    folder without one (a model saved by ``save_pretrained`` alone, as the toy's stand-in). The reference
    feeds WavLM through ``AutoFeatureExtractor`` of its folder, so this is what its numbers rest on.

    Args:
        path (str): the local Hugging Face folder.

    Returns:
        bool: normalise each clip (:func:`zero_mean_unit_var`) before WavLM.

    Raises:
        CheckpointError: naming the file and key for unreadable JSON, a ``do_normalize`` that is not a
            boolean, or a ``sampling_rate`` other than 16 kHz.
    """
    file = os.path.join(path, "preprocessor_config.json")
    if not os.path.isfile(file):
        return False
    try:
        with open(file) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"unreadable feature extractor config: {e}", file=file, reason="corrupt") from e
    if not isinstance(config, dict):
        raise CheckpointError("expected a JSON object (the feature extractor's settings)", file=file,
                              reason="corrupt")
    normalize = config.get("do_normalize", Wav2Vec2FeatureExtractor().do_normalize)
    if not isinstance(normalize, bool):
        raise CheckpointError(f"key do_normalize must be true or false, got {normalize!r}", file=file,
                              reason="mismatch")
    rate = config.get("sampling_rate", SAMPLE_RATE)
    if rate != SAMPLE_RATE:
        raise CheckpointError(f"key sampling_rate is {rate!r} but the model feeds WavLM {SAMPLE_RATE} Hz audio",
                              file=file, reason="mismatch")
    return normalize
