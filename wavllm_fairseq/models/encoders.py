"""The frozen backbones: Whisper encoder (semantic), WavLM (acoustic) and the LLaMA-family LLM.

Backbones are Hugging Face ``transformers`` modules, built from a config (random weights: tests,
parameter counting on the meta device) or loaded from a *local* directory in the Hugging Face format
through ``transformers``' own ``from_pretrained(local_files_only=True)``, so every layout it reads
loads here too: safetensors (one file or shards with ``model.safetensors.index.json``), pickle
``pytorch_model*.bin`` (read weights-only), WavLM's legacy weight-norm names (``weight_g`` /
``weight_v``), the rotary ``inv_freq`` buffers old LLaMA shards carry, a Whisper encoder taken from a
full ``WhisperForConditionalGeneration`` or ``WhisperModel`` folder. Nothing is downloaded.

Loading creates the module on the meta device and fills it from the files in the requested dtype
(``model.backbone_dtype``), so no random full-size model is materialised first. What
``transformers`` would only warn about is an error here, named with the folder: a missing folder,
config.json or weight file, a corrupt shard, a tensor whose shape differs from the config, and a
weight the folder lacks (transformers would initialise it randomly: a silent wrong result).
"""
import glob
import json
import logging
import os
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, WavLMConfig, WavLMModel, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from ..data.audio import whisper_log_mel
from ..errors import CheckpointError

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Local Hugging Face directories
# --------------------------------------------------------------------------------------------
LEGACY_WEIGHT_NORM = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}


def _weight_files(path: str) -> List[str]:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    return files


def read_hf_state_dict(path: str, prefixes: Iterable[str] = ("",)) -> Dict[str, torch.Tensor]:
    """All tensors of a local HF checkpoint whose key starts with one of ``prefixes`` (prefix removed).

    The stored tensors, for comparing a folder with another checkpoint (checkpoint_convert.py); models
    are loaded with the ``load_*`` functions below. The one renaming: torch's legacy weight-norm names
    (``weight_g`` / ``weight_v``, as wavlm-base stores its positional conv) become today's module names
    (``parametrizations.weight.original0`` / ``original1``), so the keys are the modules' keys.
    The first prefix that matches any key wins, so a directory holding a full
    ``WhisperForConditionalGeneration`` (``model.encoder.*``) and one holding a bare encoder
    (``encoder.*`` or no prefix) both work.
    """
    check_backbone_dir(path)
    files = _weight_files(path)
    tensors: Dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if f.endswith(".safetensors"):
                tensors.update(load_file(f))
            else:
                tensors.update(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:  # truncated or corrupt shard
            raise CheckpointError(f"cannot read weight file: {e}", file=f, reason="corrupt") from e
    tensors = {re.sub(r"\.(weight_[gv])$", lambda m: "." + LEGACY_WEIGHT_NORM[m.group(1)], k): v
               for k, v in tensors.items()}
    for prefix in prefixes:
        picked = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if picked:
            return picked
    raise CheckpointError(f"no tensor key starts with any of {list(prefixes)} in {path}", file=path,
                          reason="mismatch")


def check_backbone_dir(path: str) -> None:
    """A clear error for a missing folder, config.json, weight file or shard (before transformers runs)."""
    if not path or not os.path.isdir(path):
        raise CheckpointError(f"backbone directory does not exist: {path!r} (a local Hugging Face folder: "
                              "config.json + weights)", file=path, reason="missing")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise CheckpointError(f"missing config.json in backbone directory {path}", file=cfg_file, reason="missing")
    if not _weight_files(path):
        raise CheckpointError(
            f"no weights in {path}: expected *.safetensors or pytorch_model*.bin (a Hugging Face "
            "save_pretrained directory)", file=path, reason="missing")
    for index in glob.glob(os.path.join(path, "*.index.json")):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"unreadable shard index: {e}", file=index, reason="corrupt") from e
        absent = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if absent:
            raise CheckpointError(f"shards listed in the index are missing: {absent}", file=index, reason="missing")


def load_config(cls, path: str):
    check_backbone_dir(path)
    return cls.from_pretrained(path, local_files_only=True)


def _dtype_kwargs(dtype: Optional[torch.dtype]) -> dict:
    """``from_pretrained``'s dtype arguments (transformers >= 5.24, setup.py's floor: it always loads through
    the meta device). Hub kernels are off: transformers 5 defaults to them on accelerators, and they are
    fetched at run time (nothing may be) and need the ``kernels`` package."""
    return {"dtype": dtype or torch.float32, "use_kernels": False}


def from_pretrained_checked(cls, path: str, what: str, dtype: Optional[torch.dtype] = None,
                            key_mapping: Optional[Dict[str, str]] = None, may_miss: Sequence[str] = (),
                            expected_extra: Sequence[str] = ()):
    """``cls.from_pretrained(path, local_files_only=True)`` with the errors named.

    ``may_miss``: regexes of weights the folder may lack (training-only tensors); ``expected_extra``:
    regexes of stored weights this module does not use (a Whisper decoder, a WavLM CTC head), not
    reported. Any other missing weight, and any shape mismatch, is an error; other unused weights are
    logged.
    """
    check_backbone_dir(path)
    kwargs = dict(local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True,
                  **_dtype_kwargs(dtype))
    if key_mapping:
        kwargs["key_mapping"] = key_mapping
    try:
        model, info = cls.from_pretrained(path, **kwargs)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors' SafetensorError, pickle/EOF errors, OSError from a truncated shard
        raise CheckpointError(f"cannot load the {what} weights ({type(e).__name__}: {e}); a shard is corrupt or "
                              "truncated: copy the folder again", file=path, reason="corrupt") from e
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        shown = [f"{k}: file {tuple(a)} vs config {tuple(b)}" for k, a, b in mismatched[:10]]
        raise CheckpointError(f"{len(mismatched)} {what} weights do not match the sizes in config.json: {shown}; "
                              "the config and the weights come from different models", file=path, reason="mismatch")
    missing = sorted(k for k in info.get("missing_keys") or [] if not any(re.search(p, k) for p in may_miss))
    if missing:
        raise CheckpointError(f"{len(missing)} {what} weights are not in the folder (they would be random): "
                              f"{missing[:10]}", file=path, reason="mismatch")
    extra = sorted(k for k in info.get("unexpected_keys") or [] if not any(re.search(p, k) for p in expected_extra))
    if extra:
        logger.warning(f"{path}: {len(extra)} stored tensors are not used by the {what}: {extra[:10]}")
    model.eval()
    return model


# --------------------------------------------------------------------------------------------
# Frame arithmetic (ints or tensors): the encoders' output lengths, also used without a model
# --------------------------------------------------------------------------------------------
WHISPER_HOP = 160  # samples per log-mel frame (10 ms at 16 kHz)


def whisper_frames(n_samples, hop: int = WHISPER_HOP):
    """Whisper encoder frames (20 ms) for ``n_samples``: ceil(n / hop) valid mel frames (the feature
    extractor's attention mask, the reference's length), then conv2 (k=3, s=2, p=1)."""
    mel = (n_samples + hop - 1) // hop
    return (mel + 1) // 2


def wavlm_frames(n_samples, config=None):
    """WavLM frames (20 ms) for ``n_samples``: its convolutional feature extractor, no padding
    (kernels and strides of ``config``; default: WavLMConfig's, those of every released WavLM)."""
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
    concatenated, so nothing is silently truncated.
    """

    def __init__(self, encoder: nn.Module, n_fft: int = 400, hop_length: int = 160):
        super().__init__()
        self.encoder = encoder
        self.n_mels = encoder.config.num_mel_bins
        self.window = encoder.config.max_source_positions * 2  # mel frames per window
        self.n_fft = n_fft
        self.hop_length = hop_length

    @property
    def dim(self) -> int:
        return self.encoder.config.d_model

    def output_lengths(self, wav_lengths: torch.Tensor) -> torch.Tensor:
        return whisper_frames(wav_lengths, self.hop_length)

    def forward(self, wav: torch.Tensor, wav_lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
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
        return out[:, : max(1, int(lengths.max()))], lengths  # >= 1 frame so the adapter convs have input


def whisper_encoder_from_config(cfg_kwargs: dict):
    return WhisperEncoder(WhisperConfig(**cfg_kwargs))


def load_whisper_encoder(path: str, dtype: Optional[torch.dtype] = None):
    """WhisperEncoder from a local folder of a ``WhisperForConditionalGeneration`` (``model.encoder.*``, as
    openai/whisper-* are released), a ``WhisperModel`` (``encoder.*``) or a bare encoder. Only the
    encoder's tensors are read; the decoder stays on disk."""
    return from_pretrained_checked(WhisperEncoder, path, "Whisper encoder", dtype,
                                   key_mapping={r"^model\.encoder\.": "", r"^encoder\.": ""},
                                   expected_extra=(r"^(model\.)?decoder\.", r"^proj_out\."))


# --------------------------------------------------------------------------------------------
# WavLM (acoustic branch)
# --------------------------------------------------------------------------------------------
class WavLMAcousticEncoder(nn.Module):
    """Frozen WavLM on the raw waveform; returns ALL hidden states (embedding output + every layer).

    Output: ``(L+1, B, T, C)`` stacked hidden states at 20 ms and their valid lengths; the learnable
    softmax weights over them live in the acoustic adapter (they are trained).
    """

    def __init__(self, wavlm: nn.Module):
        super().__init__()
        self.wavlm = wavlm

    @property
    def dim(self) -> int:
        return self.wavlm.config.hidden_size

    @property
    def num_hidden_states(self) -> int:
        return self.wavlm.config.num_hidden_layers + 1

    def output_lengths(self, wav_lengths: torch.Tensor) -> torch.Tensor:
        return wavlm_frames(wav_lengths.long(), self.wavlm.config).clamp(min=0)

    def forward(self, wav: torch.Tensor, wav_lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # WavLM-base's feature extractor group-normalises each channel over time, so padding would
        # change a clip's features: clips of different lengths run one by one on their own samples
        # (exactly what each would get alone), equal lengths run as one batch. A layer-norm extractor
        # (feat_extract_norm="layer") runs any batch at once with an attention mask.
        dtype = next(self.wavlm.parameters()).dtype
        lengths = self.output_lengths(wav_lengths)
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


def wavlm_from_config(cfg_kwargs: dict):
    return WavLMModel(WavLMConfig(**cfg_kwargs))


def load_wavlm(path: str, dtype: Optional[torch.dtype] = None):
    """WavLMModel from a local folder (microsoft/wavlm-* layout, legacy weight-norm names included; a
    WavLMFor* head folder gives its ``wavlm.*`` body)."""
    # masked_spec_embed is only used for SpecAugment during pre-training; some exports omit it
    return from_pretrained_checked(WavLMModel, path, "WavLM", dtype, may_miss=(r"^masked_spec_embed$",),
                                   expected_extra=(r"^(lm_head|projector|classifier|feature_projector|tdnn|"
                                                   r"objective|project_q|project_hid|quantizer)\.",))


# --------------------------------------------------------------------------------------------
# LLaMA
# --------------------------------------------------------------------------------------------
def llama_from_config(cfg_kwargs: dict):
    return LlamaForCausalLM(LlamaConfig(**cfg_kwargs))


LLAMA_LAYOUT = ("q_proj", "k_proj", "v_proj", "o_proj")


def load_llama(path: str, dtype: Optional[torch.dtype] = None):
    """A LLaMA-architecture causal LM from a local folder (LLaMA-2/3, SmolLM2, Mistral, Qwen2: any
    ``AutoModelForCausalLM`` whose decoder layers have ``self_attn.{q,k,v,o}_proj``, where LoRA goes)."""
    model = from_pretrained_checked(AutoModelForCausalLM, path, "LLM", dtype,
                                    may_miss=(r"rotary_emb\.inv_freq$",))
    layers = getattr(getattr(model, "model", None), "layers", None)
    attn = getattr(layers[0], "self_attn", None) if layers is not None and len(layers) else None
    if attn is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in LLAMA_LAYOUT):
        raise CheckpointError(f"{type(model).__name__} (model_type {model.config.model_type!r}) is not a "
                              "LLaMA-architecture LLM: expected model.layers[i].self_attn.q_proj/k_proj/v_proj/o_proj",
                              file=path, reason="mismatch")
    return model


# --------------------------------------------------------------------------------------------
# The three backbones of a model config (model_config.WavLLMConfig): loaded from a local folder when
# its path is set, else built with random weights from the config's sizes
# --------------------------------------------------------------------------------------------
def build_whisper(cfg, dtype: Optional[torch.dtype] = None) -> WhisperSemanticEncoder:
    if cfg.whisper_path:
        return WhisperSemanticEncoder(load_whisper_encoder(cfg.whisper_path, dtype))
    return WhisperSemanticEncoder(whisper_encoder_from_config(dict(
        d_model=cfg.whisper_d_model, encoder_layers=cfg.whisper_layers, encoder_attention_heads=cfg.whisper_heads,
        encoder_ffn_dim=cfg.whisper_ffn_dim, num_mel_bins=cfg.whisper_num_mel_bins,
        max_source_positions=cfg.whisper_max_source_positions, decoder_layers=1,
        decoder_attention_heads=cfg.whisper_heads, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1)))


def build_wavlm(cfg, dtype: Optional[torch.dtype] = None) -> Optional[WavLMAcousticEncoder]:
    if not cfg.use_wavlm:
        return None
    if cfg.wavlm_path:
        return WavLMAcousticEncoder(load_wavlm(cfg.wavlm_path, dtype))
    return WavLMAcousticEncoder(wavlm_from_config(dict(
        hidden_size=cfg.wavlm_hidden, num_hidden_layers=cfg.wavlm_layers, num_attention_heads=cfg.wavlm_heads,
        intermediate_size=cfg.wavlm_ffn_dim, conv_dim=(cfg.wavlm_conv_dim,) * 7,
        num_conv_pos_embeddings=cfg.wavlm_conv_pos_kernel, num_conv_pos_embedding_groups=cfg.wavlm_conv_pos_groups,
        num_buckets=cfg.wavlm_num_buckets, max_bucket_distance=cfg.wavlm_max_bucket_distance)))


def build_llm(cfg, vocab_size: int, dtype: Optional[torch.dtype] = None):
    """The LLM; ``model.llama_rms_norm_eps_override`` > 0 sets its RMSNorm epsilon (loaded or not)."""
    if cfg.llama_path:
        llm = load_llama(cfg.llama_path, dtype)
    else:
        llm = llama_from_config(dict(
            hidden_size=cfg.llama_dim, num_hidden_layers=cfg.llama_layers, num_attention_heads=cfg.llama_heads,
            num_key_value_heads=cfg.llama_kv_heads, intermediate_size=cfg.llama_ffn_dim, vocab_size=vocab_size,
            max_position_embeddings=cfg.llama_max_positions, rms_norm_eps=cfg.llama_rms_norm_eps,
            bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False))
    if cfg.llama_rms_norm_eps_override > 0:
        set_rms_norm_eps(llm, cfg.llama_rms_norm_eps_override)
    return llm


def set_rms_norm_eps(llm: nn.Module, eps: float) -> int:
    """Set the epsilon of every RMSNorm of ``llm`` (and its config); returns how many were set."""
    norms = [m for m in llm.modules() if hasattr(m, "variance_epsilon")]
    for m in norms:
        m.variance_epsilon = eps
    llm.config.rms_norm_eps = eps
    return len(norms)
