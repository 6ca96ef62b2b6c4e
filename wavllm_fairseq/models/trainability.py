"""What trains: the parameter groups of a WavLLM model and their ``requires_grad``.

The policy lives here, beside LoRA (lora.py), in one function (``trainable_groups``), as torchtune keeps
``get_adapter_params`` beside its LoRA layers: every parameter belongs to exactly one named group, and a
parameter in no group is an error rather than silently trained or frozen.
"""
import logging
from typing import Dict, List, Tuple

import torch.nn as nn

from .lora import lora_parameters

logger = logging.getLogger(__name__)


# parameter-name prefix -> group, for the parameters whose group depends on nothing but their module
_PREFIX_GROUPS = (
    ("semantic_adapter.", "semantic_adapter"), ("acoustic_adapter.", "acoustic_adapter"), ("projector.", "projector"),
    ("prompt_scale.", "prompt_adapter"), ("speech_shrink.", "speech_shrink"), ("whisper.", "frozen:whisper"),
    ("wavlm.", "frozen:wavlm"), ("llm.", "frozen:llama"),
)


def trainable_groups(model: nn.Module) -> Dict[str, List[Tuple[str, nn.Parameter]]]:
    """THE place that decides what trains. Stage 1: adapters (+ WavLM layer weights), projector(s),
    LoRA. Stage 2 (``prompt_adapter=True``): the same plus the prompt adapter. Backbones: frozen.

    The reference's Whisper-only projector (Linear adapter_out -> D) is trainable in the reference and
    counted in the paper's 76.6 M, but with WavLM on it is never used, so it never gets a gradient.
    It goes to the group ``unused:semantic_only_projector`` and is held with ``requires_grad=False``:
    no optimizer state, no weight decay on a zero gradient, no DDP bucket waiting for it; it is saved
    in checkpoints unchanged (converted reference checkpoints round-trip). Counts report it separately
    (``wavllm-count-params``: trainable = optimised + unused, the paper's figure).

    Args:
        model (WavLLMModel): the model.

    Returns:
        Dict[str, List[Tuple[str, nn.Parameter]]]: group -> its (name, parameter) pairs; empty groups left out.

    Raises:
        RuntimeError: for a parameter in no group.
    """
    named = dict(model.named_parameters())
    groups: Dict[str, List[Tuple[str, nn.Parameter]]] = {
        "semantic_adapter": [], "acoustic_adapter": [], "projector": [], "lora": [], "prompt_adapter": [],
        "speech_shrink": [],
        "unused:semantic_only_projector": [], "frozen:lora": [], "frozen:whisper": [], "frozen:wavlm": [],
        "frozen:llama": [],
    }
    lora_names = set(lora_parameters(model.llm))
    for name, p in named.items():
        if name.startswith("semantic_only_projector."):
            group = "projector" if model.wavlm is None else "unused:semantic_only_projector"
        elif name.startswith("llm.") and name[len("llm."):] in lora_names:
            group = "frozen:lora" if model.cfg.freeze_lora else "lora"
        else:
            group = next((g for prefix, g in _PREFIX_GROUPS if name.startswith(prefix)), None)
        if group is None:
            raise RuntimeError(f"parameter {name} belongs to no trainability group")
        groups[group].append((name, p))
    return {k: v for k, v in groups.items() if v}


def is_optimised(group: str) -> bool:
    """Whether a trainable_groups group gets gradients (``frozen:`` backbones and ``unused:`` do not).

    Args:
        group (str): a group name of :func:`trainable_groups`.

    Returns:
        bool: whether its parameters are optimised.
    """
    return not group.startswith(("frozen:", "unused:"))


def apply_trainability(model: nn.Module) -> Dict[str, Tuple[int, int]]:
    """Set requires_grad from :func:`trainable_groups` and log the counts.

    Args:
        model (WavLLMModel): the model, changed in place.

    Returns:
        Dict[str, Tuple[int, int]]: group -> (tensors, parameters).
    """
    counts = {}
    for group, params in trainable_groups(model).items():
        for _, p in params:
            p.requires_grad_(is_optimised(group))
        counts[group] = (len(params), sum(p.numel() for _, p in params))
    total = sum(n for _, n in counts.values())
    trainable = sum(n for g, (_, n) in counts.items() if not g.startswith("frozen:"))
    optimised = sum(n for g, (_, n) in counts.items() if is_optimised(g))
    logger.info("trainable parameters by group: " + ", ".join(f"{g}={n:,}" for g, (_, n) in counts.items()))
    logger.info(f"trainable {trainable:,} of {total:,} parameters (the paper's count); optimised {optimised:,}"
                + (" (the reference's unused projector is held frozen: it never gets a gradient)"
                   if optimised != trainable else ""))
    return counts
