"""The speech branch of ``WavLLMModel``: waveform -> speech embeddings (B, N, D), and its length formula.

The data flow is drawn in wavllm.py's docstring. ``expected_speech_frames`` gives the number of
speech positions without a model (the dataset checks lengths before any model exists).
"""
from typing import Tuple

import torch
import torch.nn as nn

from . import encoders
from .adapters import fuse_streams, subsampled_frames

MIN_ENCODER_SAMPLES = 400  # shortest waveform the encoders' first convolutions accept (25 ms)


def expected_speech_frames(n_samples: int, use_wavlm: bool = True) -> int:
    """Speech embeddings (80 ms) for ``n_samples`` of audio without building a model: the same
    functions the modules' ``output_lengths`` use, with the released front ends' kernels (Whisper's
    10 ms hop and conv2, WavLM's feature extractor, the adapters' two stride-2 convs). The dataset checks
    prompt + speech + answer against the LLM context with it before any model exists (fairseq loads
    the validation sets first); equal to ``WavLLMModel.speech_frames`` (tested).

    Args:
        n_samples (int): waveform length at 16 kHz.
        use_wavlm (bool): whether the acoustic branch is on (the shorter stream sets the length).

    Returns:
        int: speech positions in the LLM input.
    """
    if n_samples <= 0:
        return 0
    n = subsampled_frames(encoders.whisper_frames(n_samples))
    if use_wavlm:
        n = min(n, subsampled_frames(max(encoders.wavlm_frames(n_samples), 0)))
    return max(n, 0)


class SpeechBranch:
    """``WavLLMModel``'s speech methods (a mixin: they read the model's ``whisper``, ``wavlm``,
    ``semantic_adapter``, ``acoustic_adapter``, ``projector`` and ``semantic_only_projector``)."""


    def speech_frames(self, audio_lengths: torch.Tensor) -> torch.Tensor:
        """Number of speech embeddings (80 ms frames) the model produces for each audio length.

        Args:
            audio_lengths (torch.Tensor): waveform lengths, shape (B,); 0 on text-only rows.

        Returns:
            torch.Tensor: speech positions N_b, shape (B,); 0 where there is no audio.
        """
        n = self.semantic_adapter.output_lengths(self.whisper.output_lengths(audio_lengths))
        if self.wavlm is not None:
            n = torch.minimum(n, self.acoustic_adapter.output_lengths(self.wavlm.output_lengths(audio_lengths)))
        return torch.where(audio_lengths > 0, n, torch.zeros_like(n)).clamp(min=0)

    def encode_speech(self, audio: torch.Tensor, audio_lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Both encoders, the adapters and the projector (the data-flow diagram of wavllm.py).

        Args:
            audio (torch.Tensor): 16 kHz waveforms with shape (B, T), right-padded.
            audio_lengths (torch.Tensor): valid samples, shape (B,).

        Returns:
            Tuple[torch.Tensor, torch.Tensor]: speech embeddings with shape (B, N, D) and their lengths (B,).
        """
        if audio.shape[1] < MIN_ENCODER_SAMPLES:  # WavLM's first conv needs 400 samples; lengths stay true
            audio = nn.functional.pad(audio, (0, MIN_ENCODER_SAMPLES - audio.shape[1]))
        with torch.no_grad():
            sem, sem_len = self.whisper(audio, audio_lengths)  # (B, Tw, Dw) at 20 ms
            if self.wavlm is not None:
                ac, ac_len = self.wavlm(audio, audio_lengths)  # (L+1, B, Tl, Dl) at 20 ms
        dtype = self.semantic_adapter.out_proj.weight.dtype
        sem, sem_len = self._semantic_per_window(sem.to(dtype), sem_len)  # (B, N1, A)
        if self.wavlm is None:
            sem_len = sem_len.clamp(min=0)
            return self.semantic_only_projector(sem)[:, : int(sem_len.max())], sem_len
        ac, ac_len = self.acoustic_adapter(ac.to(dtype), ac_len)  # (B, N2, A)
        x, lengths = fuse_streams(sem, sem_len, ac, ac_len)  # (B, N, 2A), N = the shorter stream
        return self.projector(x)[:, : int(lengths.max())], lengths  # (B, N, D)

    def _semantic_per_window(self, sem: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The semantic adapter over each Whisper window (30 s, ``W`` frames) alone, as the reference
        encodes a long clip window by window: the adapter's convolutions see zeros at a window's edge,
        not the next window's frames. (B, T, Dw) -> (B, N, A); a clip within one window is one window.
        Lengths are those of the whole clip (``W`` is a multiple of the adapter's stride 4)."""
        W = self.whisper.encoder.config.max_source_positions  # Whisper frames per window
        if sem.shape[1] <= W:
            return self.semantic_adapter(sem, lengths)
        B, T, D = sem.shape
        n = -(-T // W)
        sem = nn.functional.pad(sem, (0, 0, 0, n * W - T)).reshape(B * n, W, D)
        starts = torch.arange(n, device=lengths.device) * W
        win_len = (lengths[:, None] - starts[None, :]).clamp(0, W).reshape(-1)  # (B*n,)
        out, _ = self.semantic_adapter(sem, win_len)  # (B*n, W', A)
        out = out.reshape(B, n * out.shape[1], out.shape[2])
        total = self.semantic_adapter.output_lengths(lengths)
        return out[:, : max(1, int(total.max()))], total

