"""The frozen backbones: Whisper encoder (semantic), WavLM (acoustic) and the LLaMA LLM.

Backbones are Hugging Face ``transformers`` modules, built from a config (random weights: tests,
parameter counting on the meta device) or loaded from a *local* directory in the Hugging Face format
(``config.json`` + ``*.safetensors`` or ``pytorch_model*.bin``). Nothing is downloaded.

Loading never materialises a random full-size model first: the module is created on the meta device
and the checkpoint tensors are assigned into it (``load_state_dict(assign=True)``).
"""
import glob
import json
import logging
import os
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from .errors import CheckpointError

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Local Hugging Face directories
# --------------------------------------------------------------------------------------------
def _weight_files(path: str) -> List[str]:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    return files


def read_hf_state_dict(path: str, prefixes: Iterable[str] = ("",)) -> Dict[str, torch.Tensor]:
    """All tensors of a local HF checkpoint whose key starts with one of ``prefixes`` (prefix removed).

    The first prefix that matches any key wins, so a directory holding a full
    ``WhisperForConditionalGeneration`` (``model.encoder.*``) and one holding a bare encoder
    (``encoder.*`` or no prefix) both work.
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"backbone directory does not exist: {path}", file=path, reason="missing")
    files = _weight_files(path)
    if not files:
        raise CheckpointError(
            f"no weights in {path}: expected *.safetensors or pytorch_model*.bin (a Hugging Face "
            "save_pretrained directory)", file=path, reason="missing")
    tensors: Dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if f.endswith(".safetensors"):
                from safetensors.torch import load_file

                tensors.update(load_file(f))
            else:
                tensors.update(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:  # truncated or corrupt shard
            raise CheckpointError(f"cannot read weight file: {e}", file=f, reason="corrupt") from e
    for prefix in prefixes:
        picked = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if picked:
            return picked
    raise CheckpointError(f"no tensor key starts with any of {list(prefixes)} in {path}", file=path,
                          reason="mismatch")


def assign_state_dict(module: nn.Module, state: Dict[str, torch.Tensor], where: str,
                      dtype: Optional[torch.dtype] = None, ignore_unexpected: Iterable[str] = ()) -> None:
    """Load ``state`` into ``module`` (possibly on the meta device) strictly, naming every mismatch."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and not any(k.startswith(p) for p in ignore_unexpected)]
    bad_shape = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or bad_shape:
        lines = []
        if missing:
            lines.append(f"missing keys ({len(missing)}): {missing[:20]}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {unexpected[:20]}")
        if bad_shape:
            lines.append(f"shape mismatches ({len(bad_shape)}): {bad_shape[:20]}")
        raise CheckpointError("weights do not match the config: " + "; ".join(lines), file=where,
                              reason="mismatch")
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
             for k, v in state.items() if k in expected}
    module.load_state_dict(state, strict=True, assign=True)
    materialize_meta_buffers(module)


def load_config(cls, path: str):
    if not os.path.isdir(path):
        raise CheckpointError(f"backbone directory does not exist: {path}", file=path, reason="missing")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise CheckpointError(f"missing config.json in backbone directory {path}", file=cfg_file,
                              reason="missing")
    return cls.from_pretrained(path)


def build_on_meta(factory):
    with torch.device("meta"):
        return factory()


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
        # valid mel frames: ceil(n / hop), the feature extractor's attention mask (the reference's length)
        mel = torch.div(wav_lengths + self.hop_length - 1, self.hop_length, rounding_mode="floor")
        return torch.div(mel + 1, 2, rounding_mode="floor")  # conv2: k=3, s=2, p=1

    def forward(self, wav: torch.Tensor, wav_lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        from .audio import whisper_log_mel

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
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    return WhisperEncoder(WhisperConfig(**cfg_kwargs))


def load_whisper_encoder(path: str, dtype: Optional[torch.dtype] = None):
    """WhisperEncoder from a local directory holding a Whisper model or a bare encoder."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = load_config(WhisperConfig, path)
    enc = build_on_meta(lambda: WhisperEncoder(config))
    state = read_hf_state_dict(path, prefixes=("model.encoder.", "encoder.", ""))
    assign_state_dict(enc, state, path, dtype)
    return enc


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
        return self.wavlm._get_feat_extract_output_lengths(wav_lengths).long().clamp(min=0)

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
    from transformers import WavLMConfig, WavLMModel

    return WavLMModel(WavLMConfig(**cfg_kwargs))


def load_wavlm(path: str, dtype: Optional[torch.dtype] = None):
    from transformers import WavLMConfig, WavLMModel

    config = load_config(WavLMConfig, path)
    model = build_on_meta(lambda: WavLMModel(config))
    state = read_hf_state_dict(path, prefixes=("wavlm.", ""))
    # masked_spec_embed is only used for SpecAugment during pre-training; some exports omit it
    if "masked_spec_embed" in model.state_dict() and "masked_spec_embed" not in state:
        state["masked_spec_embed"] = torch.zeros(config.hidden_size)
    assign_state_dict(model, state, path, dtype, ignore_unexpected=("lm_head.", "projector.", "classifier."))
    return model


# --------------------------------------------------------------------------------------------
# LLaMA
# --------------------------------------------------------------------------------------------
def llama_from_config(cfg_kwargs: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**cfg_kwargs))


def load_llama(path: str, dtype: Optional[torch.dtype] = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = load_config(LlamaConfig, path)
    model = build_on_meta(lambda: LlamaForCausalLM(config))
    state = read_hf_state_dict(path, prefixes=("",))
    if config.tie_word_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    assign_state_dict(model, state, path, dtype)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def materialize_meta_buffers(module: nn.Module) -> None:
    """Rebuild buffers still on the meta device after loading.

    Non-persistent buffers (rotary ``inv_freq``) are not stored in checkpoints; the submodule that owns
    them is rebuilt from its config on the CPU and its buffers are copied over.
    """
    for name, m in module.named_modules():
        metas = [n for n, b in m.named_buffers(recurse=False) if b.is_meta]
        if not metas:
            continue
        if not hasattr(m, "config"):
            raise CheckpointError(f"buffers {metas} of {name or type(m).__name__} were not restored",
                                  reason="mismatch")
        with torch.device("cpu"):
            fresh = type(m)(m.config)
        for n in metas:
            m._buffers[n] = fresh._buffers[n]
