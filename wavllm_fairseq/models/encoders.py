"""The frozen speech encoders: Whisper's encoder (semantic branch) and WavLM (acoustic branch).

Both are Hugging Face ``transformers`` modules, built from a config (random weights: tests, parameter
counting on the meta device) or loaded from a *local* Hugging Face folder (hf_folder.py): a Whisper
encoder taken from a full ``WhisperForConditionalGeneration`` or ``WhisperModel`` folder, WavLM with
its legacy weight-norm names. Both take the 16 kHz waveform; their front ends (Whisper's log-mel,
WavLM's optional normalisation) are frontend.py. The LLM is llm.py.
"""
import hashlib
import inspect
import json
from typing import Optional, Tuple

import torch
import torch.nn as nn
from transformers import WavLMConfig, WavLMModel, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from . import frontend
from .frontend import WHISPER_HOP, WHISPER_N_FFT, wavlm_normalizes_input, whisper_log_mel, zero_mean_unit_var
from .hf_folder import from_pretrained_checked


# --------------------------------------------------------------------------------------------
# Frame arithmetic (ints or tensors): the encoders' output lengths, also used without a model
# --------------------------------------------------------------------------------------------
def whisper_frames(n_samples, hop: int = WHISPER_HOP):
    """Whisper encoder frames (20 ms) for ``n_samples``: ceil(n / hop) valid mel frames (the feature
    extractor's attention mask, the reference's length), then conv2 (k=3, s=2, p=1).

    Args:
        n_samples (int or torch.Tensor): waveform lengths at 16 kHz.
        hop (int): samples per mel frame.

    Returns:
        int or torch.Tensor: encoder frames, of the type of ``n_samples``.
    """
    mel = (n_samples + hop - 1) // hop
    return (mel + 1) // 2


def wavlm_frames(n_samples, config: Optional[WavLMConfig] = None):
    """WavLM frames (20 ms) for ``n_samples``: its convolutional feature extractor, no padding.

    Args:
        n_samples (int or torch.Tensor): waveform lengths at 16 kHz.
        config (Optional[WavLMConfig]): whose ``conv_kernel`` / ``conv_stride`` to use (default:
            WavLMConfig's, those of every released WavLM).

    Returns:
        int or torch.Tensor: frames (negative for clips shorter than the first kernel).
    """
    config = config if config is not None else _DEFAULT_WAVLM
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        n_samples = (n_samples - kernel) // stride + 1
    return n_samples


_DEFAULT_WAVLM = WavLMConfig()


# --------------------------------------------------------------------------------------------
# Whisper encoder (semantic branch)
# --------------------------------------------------------------------------------------------
class WhisperSemanticEncoder(nn.Module):
    """Frozen Whisper encoder on 80-bin log-mel features, 20 ms output stride.

    Whisper only accepts a fixed window of ``2 * max_source_positions`` mel frames (30 s for the
    real model). Shorter audio is zero-padded to the window (as Whisper was trained) and the output is
    trimmed to the valid frames; longer audio is cut into consecutive windows whose outputs are
    concatenated, so nothing is silently truncated. What the semantic adapter reads of a longer clip is its
    windows whole (:meth:`frames_read`, ``forward(..., whole_windows=True)``).

    Args:
        encoder (nn.Module): a ``transformers`` ``WhisperEncoder``.
        n_fft (int): the log-mel STFT window.
        hop_length (int): samples per mel frame.
    """

    def __init__(self, encoder: nn.Module, n_fft: int = WHISPER_N_FFT, hop_length: int = WHISPER_HOP):
        super().__init__()
        self.encoder = encoder
        self.n_mels = encoder.config.num_mel_bins
        self.window = encoder.config.max_source_positions * 2  # mel frames per window
        self.n_fft = n_fft
        self.hop_length = hop_length

    @property
    def dim(self) -> int:
        """The encoder's width ``Dw``."""
        return self.encoder.config.d_model

    def output_lengths(self, wav_lengths: torch.Tensor) -> torch.Tensor:
        """Encoder frames (20 ms); see :func:`whisper_frames`.

        Args:
            wav_lengths (torch.Tensor): waveform lengths, shape (B,).

        Returns:
            torch.Tensor: frames, shape (B,).
        """
        return whisper_frames(wav_lengths, self.hop_length)

    def frames_read(self, wav_lengths: torch.Tensor) -> torch.Tensor:
        """Frames of each clip that the semantic adapter reads (and an encoder cache stores): the valid frames
        of a clip within one window; the windows of a longer clip whole (``W = max_source_positions`` frames
        each). The reference cuts the Whisper output of a clip's stacked windows to the longest valid length
        among them, a full window's once there are two, so its subsampler reads the last window's frames past
        the valid ones: Whisper's outputs of the window's mel padding.

        Args:
            wav_lengths (torch.Tensor): waveform lengths, shape (B,).

        Returns:
            torch.Tensor: frames, shape (B,); ``output_lengths`` for clips within one window.
        """
        valid = self.output_lengths(wav_lengths)
        W = self.window // 2  # encoder frames per window
        windows = -(-valid // W)
        return torch.where(windows > 1, windows * W, valid)

    def forward(self, wav: torch.Tensor, wav_lengths: torch.Tensor,
                whole_windows: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encode a right-padded batch window by window.

        Args:
            wav (torch.Tensor): 16 kHz waveforms with shape (B, T).
            wav_lengths (torch.Tensor): valid samples, shape (B,).
            whole_windows (bool): return the frames :meth:`frames_read` counts (a clip over one window keeps
                its last window whole) instead of the valid frames only.

        Returns:
            Tuple[torch.Tensor, torch.Tensor]: hidden states with shape (B, Tw, Dw) at 20 ms (at least one
            frame) and their valid lengths (B,).
        """
        n_chunks = max(1, -(-int(wav_lengths.max()) // (self.window * self.hop_length)))
        # pad the waveform (not the features) to whole windows: padding frames are then the log-mel of
        # silence, as Whisper's own feature extractor makes them, whatever the batch
        wav = nn.functional.pad(wav, (0, n_chunks * self.window * self.hop_length - wav.shape[1]))
        # each 30 s window as the feature extractor makes it alone (its own peak, reflect at its edges),
        # as the reference feeds long clips window by window; mel_lengths = ceil(n / hop)
        mel, mel_lengths = whisper_log_mel(wav, wav_lengths, n_mels=self.n_mels, n_fft=self.n_fft,
                                           hop=self.hop_length, window_frames=self.window)  # (B, n_mels, n*W)
        B, C, F = mel.shape
        chunks = mel.view(B, C, n_chunks, self.window).permute(0, 2, 1, 3).reshape(B * n_chunks, C, self.window)
        dtype = next(self.encoder.parameters()).dtype
        out = self.encoder(chunks.to(dtype)).last_hidden_state  # (B*n, W/2, D)
        out = out.reshape(B, n_chunks * out.shape[1], out.shape[2])  # (B, n*W/2, D)
        lengths = torch.div(mel_lengths + 1, 2, rounding_mode="floor")
        keep = self.frames_read(wav_lengths) if whole_windows else lengths
        return out[:, : max(1, int(keep.max()))], lengths  # >= 1 frame so the adapter convs have input


def load_whisper_encoder(path: str, dtype: Optional[torch.dtype] = None) -> WhisperEncoder:
    """WhisperEncoder from a local folder of a ``WhisperForConditionalGeneration`` (``model.encoder.*``, as
    openai/whisper-* are released), a ``WhisperModel`` (``encoder.*``) or a bare encoder. Only the
    encoder's tensors are read; the decoder stays on disk.

    Args:
        path (str): the local Hugging Face folder.
        dtype (Optional[torch.dtype]): the dtype to load in (default float32).

    Returns:
        WhisperEncoder: the encoder, in eval mode.
    """
    return from_pretrained_checked(WhisperEncoder, path, "Whisper encoder", dtype,
                                   key_mapping={r"^model\.encoder\.": "", r"^encoder\.": ""},
                                   expected_extra=(r"^(model\.)?decoder\.", r"^proj_out\."))


# --------------------------------------------------------------------------------------------
# WavLM (acoustic branch)
# --------------------------------------------------------------------------------------------
class WavLMAcousticEncoder(nn.Module):
    """Frozen WavLM on the waveform; returns ALL hidden states (embedding output + every layer).

    The learnable softmax weights over the hidden states live in the acoustic adapter (they are trained).
    With ``normalize`` each clip is first scaled to zero mean and unit variance over its own samples, as
    the folder's feature extractor does when its ``preprocessor_config.json`` says ``do_normalize``
    (``frontend.wavlm_normalizes_input``); otherwise WavLM reads the raw waveform.

    Args:
        wavlm (nn.Module): a ``transformers`` ``WavLMModel``.
        normalize (bool): zero-mean unit-variance normalise each clip's waveform first.
    """

    def __init__(self, wavlm: nn.Module, normalize: bool = False):
        super().__init__()
        self.wavlm = wavlm
        self.normalize = bool(normalize)

    @property
    def dim(self) -> int:
        """WavLM's width ``Dl``."""
        return self.wavlm.config.hidden_size

    @property
    def num_hidden_states(self) -> int:
        """L + 1: the embedding output and every layer's."""
        return self.wavlm.config.num_hidden_layers + 1

    def output_lengths(self, wav_lengths: torch.Tensor) -> torch.Tensor:
        """Frames (20 ms); see :func:`wavlm_frames`.

        Args:
            wav_lengths (torch.Tensor): waveform lengths, shape (B,).

        Returns:
            torch.Tensor: frames (>= 0), shape (B,).
        """
        return wavlm_frames(wav_lengths.long(), self.wavlm.config).clamp(min=0)

    def forward(self, wav: torch.Tensor, wav_lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Every hidden state of each clip, as the clip alone would get them.

        WavLM-base's feature extractor group-normalises each channel over time, so padding would
        change a clip's features: clips of different lengths run one by one on their own samples,
        equal lengths run as one batch. A layer-norm extractor (``feat_extract_norm="layer"``) runs any
        batch at once with an attention mask.

        Args:
            wav (torch.Tensor): 16 kHz waveforms with shape (B, T), right-padded.
            wav_lengths (torch.Tensor): valid samples, shape (B,).

        Returns:
            Tuple[torch.Tensor, torch.Tensor]: stacked hidden states with shape (L+1, B, Tl, Dl) at 20 ms
            (zero past each clip's frames) and the valid lengths (B,).
        """
        dtype = next(self.wavlm.parameters()).dtype
        lengths = self.output_lengths(wav_lengths)
        if self.normalize:
            wav = zero_mean_unit_var(wav, wav_lengths)
        # clips shorter than the first conv's receptive field (400 samples) get no frames
        run_len = wav_lengths.clamp(min=400, max=wav.shape[1])
        if bool((run_len == run_len[0]).all()):
            out = self.wavlm(wav[:, : int(run_len[0])].to(dtype), output_hidden_states=True)
            hidden = torch.stack(out.hidden_states, dim=0)  # (L+1, B, T, C)
        elif self.wavlm.config.feat_extract_norm == "layer":
            # per-frame LayerNorm in the feature extractor (WavLM-large's layout): a padded batch with
            # an attention mask gives each clip's valid frames as alone, so it runs as one batch
            wav = wav[:, : int(run_len.max())]
            mask = (torch.arange(wav.shape[1], device=wav.device)[None, :] < run_len[:, None]).long()
            out = self.wavlm(wav.to(dtype), attention_mask=mask, output_hidden_states=True)
            hidden = torch.stack(out.hidden_states, dim=0)  # (L+1, B, T, C)
            valid = torch.arange(hidden.shape[2], device=wav.device)[None, :] < self.output_lengths(run_len)[:, None]
            hidden = hidden * valid[None, :, :, None].to(hidden.dtype)  # padding frames are zero, as alone
        else:
            rows = [torch.stack(self.wavlm(wav[b: b + 1, : int(run_len[b])].to(dtype),
                                           output_hidden_states=True).hidden_states, dim=0)  # (L+1, 1, T_b, C)
                    for b in range(wav.shape[0])]
            T = max(r.shape[2] for r in rows)
            hidden = torch.cat([nn.functional.pad(r, (0, 0, 0, T - r.shape[2])) for r in rows], dim=1)
        return hidden, lengths


def load_wavlm(path: str, dtype: Optional[torch.dtype] = None) -> WavLMModel:
    """WavLMModel from a local folder (microsoft/wavlm-* layout, legacy weight-norm names included; a
    WavLMFor* head folder gives its ``wavlm.*`` body).

    Args:
        path (str): the local Hugging Face folder.
        dtype (Optional[torch.dtype]): the dtype to load in (default float32).

    Returns:
        WavLMModel: the model, in eval mode.
    """
    # masked_spec_embed is only used for SpecAugment during pre-training; some exports omit it
    return from_pretrained_checked(WavLMModel, path, "WavLM", dtype, may_miss=(r"^masked_spec_embed$",),
                                   expected_extra=(r"^(lm_head|projector|classifier|feature_projector|tdnn|"
                                                   r"objective|project_q|project_hid|quantizer)\.",))


# --------------------------------------------------------------------------------------------
# The encoders of a model config (config.WavLLMConfig): loaded from a local folder when its path is
# set, else built with random weights from the config's sizes
# --------------------------------------------------------------------------------------------
def build_whisper(cfg, dtype: Optional[torch.dtype] = None) -> WhisperSemanticEncoder:
    """The semantic encoder of a model config.

    Args:
        cfg (WavLLMConfig): the model config (sizes filled from the architecture).
        dtype (Optional[torch.dtype]): the dtype to load in (a random one stays float32).

    Returns:
        WhisperSemanticEncoder: the encoder.
    """
    if cfg.whisper_path:
        return WhisperSemanticEncoder(load_whisper_encoder(cfg.whisper_path, dtype))
    return WhisperSemanticEncoder(WhisperEncoder(WhisperConfig(
        d_model=cfg.whisper_d_model, encoder_layers=cfg.whisper_layers, encoder_attention_heads=cfg.whisper_heads,
        encoder_ffn_dim=cfg.whisper_ffn_dim, num_mel_bins=cfg.whisper_num_mel_bins,
        max_source_positions=cfg.whisper_max_source_positions, decoder_layers=1,
        decoder_attention_heads=cfg.whisper_heads, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1)))


def build_wavlm(cfg, dtype: Optional[torch.dtype] = None) -> Optional[WavLMAcousticEncoder]:
    """The acoustic encoder of a model config, or None with ``model.use_wavlm=false``.

    Args:
        cfg (WavLLMConfig): the model config (sizes filled from the architecture).
        dtype (Optional[torch.dtype]): the dtype to load in (a random one stays float32).

    Returns:
        Optional[WavLMAcousticEncoder]: the encoder.
    """
    if not cfg.use_wavlm:
        return None
    if cfg.wavlm_path:
        return WavLMAcousticEncoder(load_wavlm(cfg.wavlm_path, dtype), wavlm_normalizes_input(cfg.wavlm_path))
    return WavLMAcousticEncoder(WavLMModel(WavLMConfig(
        hidden_size=cfg.wavlm_hidden, num_hidden_layers=cfg.wavlm_layers, num_attention_heads=cfg.wavlm_heads,
        intermediate_size=cfg.wavlm_ffn_dim, conv_dim=(cfg.wavlm_conv_dim,) * 7,
        num_conv_pos_embeddings=cfg.wavlm_conv_pos_kernel, num_conv_pos_embedding_groups=cfg.wavlm_conv_pos_groups,
        num_buckets=cfg.wavlm_num_buckets, max_bucket_distance=cfg.wavlm_max_bucket_distance)))


# --------------------------------------------------------------------------------------------
# What the encoders' outputs depend on (the key of data/encoder_cache.py's records)
# --------------------------------------------------------------------------------------------
def encoder_fingerprint(whisper: "WhisperSemanticEncoder",
                        wavlm: Optional["WavLMAcousticEncoder"]) -> Tuple[str, dict]:
    """A digest of everything the frozen encoders' outputs depend on besides the audio: every weight
    tensor (names, dtypes, shapes, bytes), each backbone's config, the wrappers' settings, and the source
    of the code that runs them (this module and the log-mel front end), so a changed backbone folder,
    dtype or encoder code never reads another's records. Not where the folder is: the config's
    ``_name_or_path`` is left out, so the same weights copied or moved elsewhere find their records.

    Args:
        whisper (WhisperSemanticEncoder): the semantic encoder.
        wavlm (Optional[WavLMAcousticEncoder]): the acoustic encoder, or None (Whisper only).

    Returns:
        Tuple[str, dict]: the hex SHA-1, and a readable description of what went into it (no tensors).
    """
    h = hashlib.sha1()
    description = {}
    for module in (inspect.getmodule(encoder_fingerprint), frontend):
        source = inspect.getsource(module).encode()
        h.update(source)
        description.setdefault("code", {})[module.__name__] = hashlib.sha1(source).hexdigest()
    for name, enc, inner in (("whisper", whisper, getattr(whisper, "encoder", None)),
                             ("wavlm", wavlm, getattr(wavlm, "wavlm", None))):
        if enc is None:
            h.update(f"{name}:none".encode())
            description[name] = None
            continue
        settings = {k: v for k, v in vars(enc).items()
                    if isinstance(v, (int, float, str, bool)) and not k.startswith("_")}
        config = inner.config.to_dict()
        hashed = {k: v for k, v in config.items() if k != "_name_or_path"}  # a path, not content
        h.update(json.dumps([name, type(enc).__name__, settings, hashed], sort_keys=True, default=str).encode())
        for key, tensor in sorted(enc.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        description[name] = {"class": type(enc).__name__, "settings": settings,
                             "config": {k: config[k] for k in sorted(config) if k in _CONFIG_KEYS_SHOWN},
                             "dtype": str(next(enc.parameters()).dtype)}
    return h.hexdigest(), description


_CONFIG_KEYS_SHOWN = ("d_model", "encoder_layers", "hidden_size", "num_hidden_layers", "num_mel_bins",
                      "max_source_positions", "feat_extract_norm", "_name_or_path")
