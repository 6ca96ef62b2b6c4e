"""The key map from the reference release's state dict to this plugin's names and layouts
(``wavllm-convert-reference-checkpoint``; ``convert_reference`` checks and writes the result).

Every source key is mapped by one rule of ``KEY_MAP``; a key no rule covers is reported as unmatched.
LoRA ``x @ A @ B`` with ``A: (in, R)``, ``B: (R, out)`` becomes ``lora_B(lora_A(x))`` with ``lora_A.weight =
A.T`` and ``lora_B.weight = B.T``; the q and k outputs (base weights and LoRA rows) go from Meta's
interleaved rotary layout to Hugging Face's halves (``lora.rotary_meta_to_hf_rows``). WavLM's positional
convolution is weight-normed: a release saved by torch < 2.1 (the reference pins 2.0.1) names its two tensors
``weight_g`` / ``weight_v``, a later torch ``parametrizations.weight.original0`` / ``original1``; both become
the latter, the names the module has today (``hf_folder.LEGACY_WEIGHT_NORM``, as for folders).
"""
import re
from typing import Dict, List, Optional, Tuple

import torch

from ..errors import CheckpointError
from ..models.hf_folder import LEGACY_WEIGHT_NORM
from ..models.lora import rotary_meta_to_hf_rows

LLAMA = "gpt_model.model_llama."
_PROJ = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
_BOTTLENECK = {"down_layer": "down", "up_layer": "up", "layer_norm": "layer_norm"}
_L = re.escape(LLAMA)

# (source regex, target template, transform, backbone group). ``{b}`` / ``{p}`` / ``{w}`` in a template are
# filled from the bottleneck / projection / legacy weight-norm name in group 1 / 2 / 2. Backbone groups
# (whisper, wavlm, llm) are dropped when the matching local directory is given (the model reloads them from
# there, and they are compared with it); without a directory they are carried into the checkpoint.
KEY_MAP: List[Tuple[str, str, str, str]] = [
    # semantic branch (Whisper side)
    (r"audio_encoder\.subsample\.conv_layers\.(\d+)\.(weight|bias)", r"semantic_adapter.subsampler.conv_layers.\1.\2",
     "copy", ""),
    (r"audio_encoder\.adapter\.(down_layer|up_layer|layer_norm)\.(weight|bias)", r"semantic_adapter.bottleneck.{b}.\2",
     "copy", ""),
    (r"audio_encoder\.projector\.(weight|bias)", r"semantic_adapter.out_proj.\1", "copy", ""),
    # acoustic branch (WavLM side)
    (r"wavlm_encoder\.output_weights", "acoustic_adapter.layer_weights", "copy", ""),
    (r"wavlm_encoder\.subsample\.conv_layers\.(\d+)\.(weight|bias)", r"acoustic_adapter.subsampler.conv_layers.\1.\2",
     "copy", ""),
    (r"wavlm_encoder\.adapter\.(down_layer|up_layer|layer_norm)\.(weight|bias)", r"acoustic_adapter.bottleneck.{b}.\2",
     "copy", ""),
    (r"wavlm_encoder\.projector\.(weight|bias)", r"acoustic_adapter.out_proj.\1", "copy", ""),
    # projector into the LLM, and the reference's unused Whisper-only projection
    (r"wavlm_audio_proj\.(weight|bias)", r"projector.\1", "copy", ""),
    (r"audio_proj\.(weight|bias)", r"semantic_only_projector.\1", "copy", ""),
    # LoRA on q, k, v, o of every layer
    (_L + r"layers\.(\d+)\.attention\.(wq|wk|wv|wo)_lora_A", r"llm.model.layers.\1.self_attn.{p}.lora_A.weight",
     "lora_A", ""),
    (_L + r"layers\.(\d+)\.attention\.(wq|wk|wv|wo)_lora_B", r"llm.model.layers.\1.self_attn.{p}.lora_B.weight",
     "lora_B", ""),
    # prompt-aware LoRA weight adapter (stage 2)
    (_L + r"scale_fc_1\.(weight|bias)", r"prompt_scale.down.\1", "copy", ""),
    (_L + r"scale_fc_2\.(weight|bias)", r"prompt_scale.up.\1", "copy", ""),
    (_L + r"scale_weight_attention\.(weight|bias)", r"prompt_scale.attention.\1", "copy", ""),
    # frozen backbones: Hugging Face module layouts inside both models
    (r"audio_encoder\.model\.(.+)", r"whisper.encoder.\1", "copy", "whisper"),
    (r"wavlm_encoder\.model\.(.+)\.(weight_g|weight_v)", r"wavlm.wavlm.\1.{w}", "copy", "wavlm"),
    (r"wavlm_encoder\.model\.(.+)", r"wavlm.wavlm.\1", "copy", "wavlm"),
    (_L + r"tok_embeddings\.weight", "llm.model.embed_tokens.weight", "copy", "llm"),
    (_L + r"norm\.weight", "llm.model.norm.weight", "copy", "llm"),
    (_L + r"output\.weight", "llm.lm_head.weight", "copy", "llm"),
    (_L + r"layers\.(\d+)\.attention\.(wq|wk|wv|wo)\.weight", r"llm.model.layers.\1.self_attn.{p}.base.weight",
     "qk_rows", "llm"),
    (_L + r"layers\.(\d+)\.feed_forward\.w1\.weight", r"llm.model.layers.\1.mlp.gate_proj.weight", "copy", "llm"),
    (_L + r"layers\.(\d+)\.feed_forward\.w2\.weight", r"llm.model.layers.\1.mlp.down_proj.weight", "copy", "llm"),
    (_L + r"layers\.(\d+)\.feed_forward\.w3\.weight", r"llm.model.layers.\1.mlp.up_proj.weight", "copy", "llm"),
    (_L + r"layers\.(\d+)\.attention_norm\.weight", r"llm.model.layers.\1.input_layernorm.weight", "copy", "llm"),
    (_L + r"layers\.(\d+)\.ffn_norm\.weight", r"llm.model.layers.\1.post_attention_layernorm.weight", "copy", "llm"),
]
GROUP_PATH = {"whisper": "whisper_path", "wavlm": "wavlm_path", "llm": "llama_path"}


def meta_to_hf_rows(n_heads: int, out_features: int) -> torch.Tensor:
    """``lora.rotary_meta_to_hf_rows`` with a CheckpointError for impossible shapes.

    Args:
        n_heads (int): attention heads of the projection.
        out_features (int): its output rows.

    Returns:
        torch.Tensor: (out_features,) the index that puts Meta-ordered rows into Hugging Face's order.
    """
    try:
        return rotary_meta_to_hf_rows(n_heads, out_features)
    except ValueError as e:
        raise CheckpointError(str(e), reason="mismatch") from e


def _clean_key(key: str) -> str:
    """Drop wrapper prefixes some saves leave in keys (activation checkpointing, DDP)."""
    key = key.replace("_checkpoint_wrapped_module.", "")
    return key[len("module."):] if key.startswith("module.") else key


def convert_state_dict(src: Dict[str, torch.Tensor], n_heads: int, n_kv_heads: Optional[int] = None,
                       reload_groups: Tuple[str, ...] = ()) -> Tuple[Dict[str, torch.Tensor], Dict[str, List[str]]]:
    """Map a reference state dict to this plugin's names and layouts.

    Args:
        src (Dict[str, torch.Tensor]): the release's state dict.
        n_heads (int): the LLM's attention heads (for the rotary row order of q).
        n_kv_heads (Optional[int]): its key/value heads (of k; default ``n_heads``).
        reload_groups (Tuple[str, ...]): backbones (of whisper, wavlm, llm) reloaded from local directories:
            their tensors are left out of ``converted`` (still converted, into ``report["backbone"]``, for the
            equality check) and listed in ``report["dropped"]``.

    Returns:
        Tuple[Dict[str, torch.Tensor], Dict[str, List[str]]]: ``(converted, report)``; ``report`` has
        ``mapped``, ``dropped``, ``unmatched`` (source keys no rule covers) and ``backbone`` (name -> tensor
        of the dropped ones, in this plugin's layout).
    """
    n_kv_heads = n_kv_heads or n_heads
    out: Dict[str, torch.Tensor] = {}
    report: Dict[str, list] = {"mapped": [], "dropped": [], "unmatched": [], "backbone": {}}
    rules = [(re.compile(p + r"\Z"), t, f, g) for p, t, f, g in KEY_MAP]
    for raw_key, value in src.items():
        key = _clean_key(raw_key)
        for rx, template, how, group in rules:
            m = rx.match(key)
            if not m:
                continue
            if "{b}" in template:
                template = template.replace("{b}", _BOTTLENECK[m.group(1)])
            if "{p}" in template:
                template = template.replace("{p}", _PROJ[m.group(2)])
            if "{w}" in template:
                template = template.replace("{w}", LEGACY_WEIGHT_NORM[m.group(2)])
            target = m.expand(template)
            tensor = _transform(how, value, m, n_heads, n_kv_heads)
            if group in reload_groups:
                report["dropped"].append(f"{raw_key}: frozen {group} backbone, reloaded from model.{GROUP_PATH[group]}")
                report["backbone"][target] = tensor
                break
            if target in out:
                raise CheckpointError(f"two source keys map to {target} (second: {raw_key})", reason="mismatch")
            out[target] = tensor
            report["mapped"].append(f"{raw_key} -> {target}")
            break
        else:
            report["unmatched"].append(raw_key)
    return out, report


def _transform(how: str, value: torch.Tensor, m: "re.Match", n_heads: int, n_kv_heads: int) -> torch.Tensor:
    if how == "copy":
        return value.clone()
    if value.dim() != 2:
        raise CheckpointError(f"{m.group(0)} should be 2-D, got shape {tuple(value.shape)}", reason="mismatch")
    if how == "lora_A":  # x @ A with A: (in, R)  ->  Linear(in, R).weight: (R, in)
        return value.t().contiguous()
    if how == "lora_B":  # (R, out) -> Linear(R, out).weight: (out, R); output rows as the base weight's
        value = value.t().contiguous()
    proj = m.group(2)
    if proj in ("wq", "wk"):  # q and k outputs are rotated: Meta -> HF row order (also their LoRA rows)
        value = value[meta_to_hf_rows(n_heads if proj == "wq" else n_kv_heads, value.shape[0])]
    return value.clone() if how == "qk_rows" else value
