"""The speech branch of ``WavLLMModel``: waveform -> speech embeddings (B, N, D), and its length formula.

The data flow is drawn in wavllm.py's docstring. ``expected_speech_frames`` gives the number of
speech positions without a model (the dataset checks lengths before any model exists).
"""
from typing import List, Optional, Tuple

import numpy as np
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
    ``semantic_adapter``, ``acoustic_adapter``, ``projector``, ``semantic_only_projector`` and
    ``encoder_cache``).

    ``encoder_cache`` (None, or an object with ``key(samples)``, ``get(key)``, ``put(key, arrays)`` and
    ``dtype``: data/encoder_cache.py's ``EncoderCache``) serves the frozen encoders' outputs per clip:
    a clip found there skips both encoders; a clip that is not is encoded with the others that are not
    and stored. The stored arrays are what the adapters read of the live outputs (the valid frames, past
    which the adapters see zeros either way; of Whisper, a clip over one window keeps its windows whole:
    ``WhisperSemanticEncoder.frames_read``), so a float32 cache gives the live numbers (up to the float
    rounding of encoding a clip in another batch).
    """

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

    def encode_speech(self, audio: torch.Tensor, audio_lengths: torch.Tensor,
                      shrink: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """Both encoders, the adapters and the projector (the data-flow diagram of wavllm.py).

        Args:
            audio (torch.Tensor): 16 kHz waveforms with shape (B, T), right-padded.
            audio_lengths (torch.Tensor): valid samples, shape (B,).
            shrink (bool): with ``model.speech_shrink=ctc``, the shrunk span the LLM reads (models/shrink.py);
                False: every 80 ms frame (what stage 1a's CTC scores). No effect without the option.

        Returns:
            Tuple[torch.Tensor, torch.Tensor]: speech embeddings with shape (B, N, D) and their lengths (B,).
        """
        with torch.no_grad():
            if getattr(self, "encoder_cache", None) is not None:
                sem, sem_len, ac, ac_len = self._encoders_through_cache(audio, audio_lengths)
            else:
                sem, sem_len, ac, ac_len = self._run_encoders(audio, audio_lengths)
        dtype = self.semantic_adapter.out_proj.weight.dtype
        sem, sem_len = self._semantic_per_window(sem.to(dtype), sem_len)  # (B, N1, A)
        if self.wavlm is None:
            lengths = sem_len.clamp(min=0)
            x = self.semantic_only_projector(sem)[:, : int(lengths.max())]
        else:
            ac, ac_len = self.acoustic_adapter(ac.to(dtype), ac_len)  # (B, N2, A)
            x, lengths = fuse_streams(sem, sem_len, ac, ac_len)  # (B, N, 2A), N = the shorter stream
            x = self.projector(x)[:, : int(lengths.max())]  # (B, N, D)
        if shrink and getattr(self, "speech_shrink", None) is not None:
            x, lengths = self.speech_shrink(x, lengths, self.llm.get_input_embeddings().weight)
        return x, lengths

    def encoder_fingerprint(self) -> Tuple[str, dict]:
        """What the frozen encoders' outputs depend on besides the audio (see
        ``encoders.encoder_fingerprint``): the key folder of an encoder cache.

        Returns:
            Tuple[str, dict]: the hex digest and a readable description.
        """
        return encoders.encoder_fingerprint(self.whisper, self.wavlm)

    def _run_encoders(self, audio: torch.Tensor, audio_lengths: torch.Tensor):
        """The frozen encoders on a batch: Whisper (B, Tw, Dw) and WavLM (L+1, B, Tl, Dl) or None, both at
        20 ms, with their valid lengths (B,)."""
        if audio.shape[1] < MIN_ENCODER_SAMPLES:  # WavLM's first conv needs 400 samples; lengths stay true
            audio = nn.functional.pad(audio, (0, MIN_ENCODER_SAMPLES - audio.shape[1]))
        sem, sem_len = self.whisper(audio, audio_lengths, whole_windows=True)  # (B, Tw, Dw) at 20 ms
        ac = ac_len = None
        if self.wavlm is not None:
            ac, ac_len = self.wavlm(audio, audio_lengths)  # (L+1, B, Tl, Dl) at 20 ms
        return sem, sem_len, ac, ac_len

    def _encoders_through_cache(self, audio: torch.Tensor, audio_lengths: torch.Tensor):
        """:meth:`_run_encoders` with each clip's outputs read from ``encoder_cache`` when it holds them;
        the clips it lacks are encoded together and stored. Same shapes and lengths as the live path."""
        cache = self.encoder_cache
        lengths: List[int] = audio_lengths.tolist()
        samples = audio.detach().float().cpu().numpy()
        keys = [cache.key(samples[b, :n]) if n > 0 else None for b, n in enumerate(lengths)]
        found: List[Optional[dict]] = [cache.get(k) if k is not None else None for k in keys]
        missing = [b for b, k in enumerate(keys) if k is not None and found[b] is None]
        if missing:
            index = torch.tensor(missing, device=audio.device)
            sub_len = audio_lengths.index_select(0, index)
            sub = audio.index_select(0, index)[:, : int(sub_len.max())]
            sem, _, ac, ac_len = self._run_encoders(sub, sub_len)
            sem_read = self.whisper.frames_read(sub_len)
            stored = {}  # a clip twice in one batch (sampling with replacement) is stored once
            for j, b in enumerate(missing):
                arrays = {"whisper": sem[j, : int(sem_read[j])].float().cpu().numpy()}
                if ac is not None:
                    arrays["wavlm"] = ac[:, j, : int(ac_len[j])].float().cpu().numpy()
                if keys[b] not in stored:
                    cache.put(keys[b], arrays)
                    # what a later epoch reads back: rounded to the stored dtype, so every epoch sees the same
                    stored[keys[b]] = {k: v.astype(cache.dtype) for k, v in arrays.items()}
                found[b] = stored[keys[b]]
        sem_len = self.whisper.output_lengths(audio_lengths)
        dtype = next(self.whisper.parameters()).dtype
        sem = _stack_frames([f["whisper"] if f is not None else None for f in found],
                            self.whisper.frames_read(audio_lengths), self.whisper.dim, dtype, audio.device,
                            time_dim=0)  # (B, Tw, Dw)
        ac = ac_len = None
        if self.wavlm is not None:
            ac_len = self.wavlm.output_lengths(audio_lengths)
            ac = _stack_frames([f["wavlm"] if f is not None else None for f in found], ac_len, self.wavlm.dim,
                               next(self.wavlm.parameters()).dtype, audio.device, time_dim=1,
                               layers=self.wavlm.num_hidden_states)  # (L+1, B, Tl, Dl)
        return sem, sem_len, ac, ac_len

    def _semantic_per_window(self, sem: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The semantic adapter over each Whisper window (30 s, ``W`` frames) alone, as the reference
        encodes a long clip window by window: the adapter's convolutions see zeros at a window's edges,
        not the neighbouring windows' frames. A clip within one window is one window, read up to its valid
        frames; a longer clip's windows are read whole, the last one's frames past the valid ones included
        (``WhisperSemanticEncoder.frames_read``: what the reference's subsampler reads), so ``sem`` must hold
        them. (B, T, Dw) -> (B, N, A). Lengths are those of the whole clip (``W`` is a multiple of the
        adapter's stride 4)."""
        W = self.whisper.encoder.config.max_source_positions  # Whisper frames per window
        if sem.shape[1] <= W:
            return self.semantic_adapter(sem, lengths)
        B, T, D = sem.shape
        n = -(-T // W)
        sem = nn.functional.pad(sem, (0, 0, 0, n * W - T)).reshape(B * n, W, D)
        starts = torch.arange(n, device=lengths.device) * W
        valid = (lengths[:, None] - starts[None, :]).clamp(0, W)  # (B, n) valid frames of each window
        windows = (valid > 0).sum(1, keepdim=True)  # (B, 1) windows of each clip
        win_len = torch.where((windows > 1) & (valid > 0), torch.full_like(valid, W), valid).reshape(-1)  # (B*n,)
        out, _ = self.semantic_adapter(sem, win_len)  # (B*n, W', A)
        out = out.reshape(B, n * out.shape[1], out.shape[2])
        total = self.semantic_adapter.output_lengths(lengths)
        return out[:, : max(1, int(total.max()))], total


class FrozenEncoders(SpeechBranch, nn.Module):
    """Only the two frozen encoders of a model config, built as ``WavLLMModel`` builds them (same weights,
    dtype and fingerprint): what ``wavllm-cache-encoders`` runs to fill an encoder cache without the LLM.

    Args:
        cfg (WavLLMConfig): a model config with its sizes filled (``architectures.fill_from_arch``).
        dtype (torch.dtype): the backbones' dtype (``model.backbone_dtype``).
    """

    def __init__(self, cfg, dtype: torch.dtype):
        super().__init__()
        self.whisper = encoders.build_whisper(cfg, dtype)
        self.wavlm = encoders.build_wavlm(cfg, dtype)
        self.encoder_cache = None
        self.eval()

    @torch.no_grad()
    def fill(self, audio: torch.Tensor, audio_lengths: torch.Tensor) -> None:
        """Store the outputs of the clips of a batch that the attached cache lacks.

        Args:
            audio (torch.Tensor): 16 kHz waveforms with shape (B, T), right-padded.
            audio_lengths (torch.Tensor): valid samples, shape (B,).
        """
        if self.encoder_cache is None:
            raise RuntimeError("attach an encoder cache first (data.encoder_cache.attach_encoder_cache)")
        self._encoders_through_cache(audio, audio_lengths)


def _stack_frames(rows: List[Optional[np.ndarray]], lengths: torch.Tensor, dim: int, dtype: torch.dtype,
                  device: torch.device, time_dim: int, layers: Optional[int] = None) -> torch.Tensor:
    """Per-clip encoder outputs (cache records) -> one zero-padded batch tensor.

    Args:
        rows (List[Optional[np.ndarray]]): per clip (T_b, D) (``time_dim`` 0) or (L+1, T_b, D) (``time_dim``
            1), or None for a clip without audio.
        lengths (torch.Tensor): the frames the encoder gives each clip, shape (B,); a record must hold as many.
        dim (int): D.
        dtype (torch.dtype): the encoder's output dtype.
        device (torch.device): where the batch lives.
        time_dim (int): the frame axis of a record.
        layers (Optional[int]): L+1 for stacked hidden states (``time_dim`` 1).

    Returns:
        torch.Tensor: (B, T, D), or (L+1, B, T, D) with ``layers``; T = max(1, max(lengths)).
    """
    B, T = len(rows), max(1, int(lengths.max()))
    out = torch.zeros(((layers,) if layers else ()) + (B, T, dim), dtype=dtype)
    for b, arr in enumerate(rows):
        if arr is None:
            continue
        if arr.shape[time_dim] != int(lengths[b]) or arr.shape[-1] != dim:
            raise ValueError(f"encoder cache record of clip {b} has shape {arr.shape}, the encoder gives "
                             f"{int(lengths[b])} frames of width {dim}: the cache folder belongs to other encoders")
        t = torch.from_numpy(np.array(arr, dtype=np.float32))
        if layers:
            out[:, b, : t.shape[1]] = t.to(dtype)
        else:
            out[b, : t.shape[0]] = t.to(dtype)
    return out.to(device)
