"""The Whisper encoder's front end: 16 kHz waveform -> log-mel features, as ``WhisperFeatureExtractor`` makes them.

The model takes waveforms (as the reference's does); this is the first step of its semantic branch
(``encoders.WhisperSemanticEncoder``). Per frame: periodic hann window, centred STFT, power, slaney
mel filters, ``log10(max(x, 1e-10))``, floor at (peak - 8), ``(x + 4) / 4``.
"""
import functools
from typing import Optional, Tuple

import numpy as np
import torch
from transformers.audio_utils import mel_filter_bank

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
