"""The frozen LLM: a LLaMA-architecture causal LM, built from the config's sizes or loaded from a local folder.

Any ``AutoModelForCausalLM`` whose decoder layers have ``self_attn.{q,k,v,o}_proj`` (LLaMA-2/3,
SmolLM2, Mistral, Qwen2) loads: those projections are where LoRA goes (``LORA_TARGETS``).
"""
from typing import Optional

import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ..errors import CheckpointError
from .hf_folder import from_pretrained_checked

# the attention projections of every decoder layer: what LoRA wraps, and what a loaded LLM must have
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def load_llama(path: str, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A LLaMA-architecture causal LM from a local folder (see the module docstring).

    Args:
        path (str): the local Hugging Face folder.
        dtype (Optional[torch.dtype]): the dtype to load in (default float32).

    Returns:
        nn.Module: the ``AutoModelForCausalLM``, in eval mode.

    Raises:
        CheckpointError: for a folder that does not load, or an LLM without the LoRA target projections.
    """
    model = from_pretrained_checked(AutoModelForCausalLM, path, "LLM", dtype,
                                    may_miss=(r"rotary_emb\.inv_freq$",))
    layers = getattr(getattr(model, "model", None), "layers", None)
    attn = getattr(layers[0], "self_attn", None) if layers is not None and len(layers) else None
    if attn is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in LORA_TARGETS):
        raise CheckpointError(f"{type(model).__name__} (model_type {model.config.model_type!r}) is not a "
                              "LLaMA-architecture LLM: expected model.layers[i].self_attn.q_proj/k_proj/v_proj/o_proj",
                              file=path, reason="mismatch")
    return model


def build_llm(cfg, vocab_size: int, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The LLM of a model config: loaded from ``cfg.llama_path`` when set, else random from its sizes.

    ``model.llama_rms_norm_eps_override`` > 0 sets its RMSNorm epsilon (loaded or not).

    Args:
        cfg (WavLLMConfig): the model config (sizes filled from the architecture).
        vocab_size (int): embedding rows of a randomly initialised LLM.
        dtype (Optional[torch.dtype]): the dtype to load in (a random one stays float32).

    Returns:
        nn.Module: the causal LM.
    """
    if cfg.llama_path:
        llm = load_llama(cfg.llama_path, dtype)
    else:
        llm = LlamaForCausalLM(LlamaConfig(
            hidden_size=cfg.llama_dim, num_hidden_layers=cfg.llama_layers, num_attention_heads=cfg.llama_heads,
            num_key_value_heads=cfg.llama_kv_heads, intermediate_size=cfg.llama_ffn_dim, vocab_size=vocab_size,
            max_position_embeddings=cfg.llama_max_positions, rms_norm_eps=cfg.llama_rms_norm_eps,
            bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False))
    if cfg.llama_rms_norm_eps_override > 0:
        set_rms_norm_eps(llm, cfg.llama_rms_norm_eps_override)
    return llm


def set_rms_norm_eps(llm: nn.Module, eps: float) -> int:
    """Set the epsilon of every RMSNorm of ``llm`` (and its config).

    Args:
        llm (nn.Module): the causal LM.
        eps (float): the new epsilon.

    Returns:
        int: how many norms were set.
    """
    norms = [m for m in llm.modules() if hasattr(m, "variance_epsilon")]
    for m in norms:
        m.variance_epsilon = eps
    llm.config.rms_norm_eps = eps
    return len(norms)
