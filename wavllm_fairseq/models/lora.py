"""LoRA for the frozen LLM's attention projections, with an optional per-utterance scale.

    h = W0 x + s * B(A(dropout(x)))

where ``W0`` is the frozen base ``nn.Linear``, ``A`` maps ``in_features -> rank`` and ``B`` maps
``rank -> out_features`` (``B`` starts at zero, so an untrained adapter is the base model). The scale
``s`` is

* ``alpha / rank`` (plain LoRA, WavLLM stage 1), or
* a per-utterance vector ``r`` of shape ``(B, out_features)`` produced by the prompt-aware LoRA weight
  adapter (stage 2): ``h = W0 x + (B A x) * r``, broadcast over every position of the utterance. As in
  the reference implementation, ``alpha / rank`` is *not* applied on top of ``r``.

  ``r`` has the width of the query / output projections (``n_heads * head_dim`` = the LLM width, as in
  the reference's LLaMA-2-7B). An LLM with grouped-query attention (LLaMA-3, SmolLM2, Qwen2) has
  narrower key / value projections (``n_kv_heads * head_dim``): there the key / value scale is ``r``
  averaged over the query heads that share each key / value head (``scale_groups`` = heads per group),
  so one vector still scales every LoRA layer and equals ``r`` itself when there is no grouping.

The scale vector is set for a whole forward pass through :func:`lora_scale_context` so the
Hugging Face attention code does not need to know about it. Because that state lives on the modules,
activation checkpointing must recompute a layer with the state its forward saw, not the state at
backward time (the context has exited by then): :func:`checkpoint_context_fn` gives
``torch.utils.checkpoint`` a recomputation context that reinstalls it.

Initialisation follows the reference implementation: ``B = 0`` and ``A`` uniform in
``(-1/sqrt(rank), 1/sqrt(rank))``, which is PyTorch's kaiming-uniform (``a = sqrt(5)``) applied to ``A``
stored as ``(in_features, rank)`` (fan-in = rank): 0.177 at rank 32. ``a_init="fan_in_features"`` is
kaiming-uniform on ``nn.Linear``'s ``(rank, in_features)`` layout (fan-in = in_features, as PEFT does):
1/sqrt(4096) = 0.0156 for LLaMA-7B, about 11x smaller, so LoRA moves about 11x slower under Adam.
"""
import contextlib
import math
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn


A_INITS = ("reference", "fan_in_features")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update (see module docstring).

    Args:
        base (nn.Linear): the frozen projection W0 (in_features -> out_features).
        rank (int): rank R of the low-rank update.
        alpha (float): the plain-LoRA scale is alpha / R.
        dropout (float): dropout on the LoRA input.
        a_init (str): one of ``A_INITS`` (see module docstring).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, a_init: str = "reference"):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        if a_init not in A_INITS:
            raise ValueError(f"LoRA A init must be one of {A_INITS}, got {a_init!r}")
        self.a_init = a_init
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.enabled = True
        # (B, out_features) per-utterance scale, set by lora_scale_context; None = alpha / rank
        self.scale_vector: Optional[torch.Tensor] = None
        # optional reordering of the scale's features (r[:, scale_rows]): a q/k projection converted from
        # Meta's rotary layout keeps a scale learnt in that layout (see tools/convert_reference.py)
        # (a buffer, not a plain attribute, so it moves with the model: a CPU index tensor on a CUDA model
        # would be copied to the device on every call, which a captured CUDA graph cannot do)
        self.register_buffer("scale_rows", None, persistent=False)
        # query heads per key/value head when this is a grouped-query k/v projection (see module docstring)
        self.scale_groups = 1
        self.scale_head_dim = base.out_features
        self.reset_lora_parameters()

    def share_scale_over_query_groups(self, groups: int, head_dim: int) -> None:
        """Make this grouped-query key/value projection read the (B, groups * out_features) scale as
        the mean over the ``groups`` query heads that share each of its heads.

        Args:
            groups (int): query heads per key/value head.
            head_dim (int): width of one head.
        """
        if groups < 1 or self.out_features % head_dim:
            raise ValueError(f"cannot group a {self.out_features}-wide scale in heads of {head_dim} x {groups}")
        self.scale_groups, self.scale_head_dim = groups, head_dim

    @property
    def in_features(self) -> int:
        """The base projection's input width."""
        return self.base.in_features

    @property
    def out_features(self) -> int:
        """The base projection's output width."""
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (some Hugging Face code paths read ``proj.weight.dtype`` / ``.device``)."""
        return self.base.weight

    def reset_lora_parameters(self) -> None:
        """``B = 0`` and ``A`` per ``a_init`` (see module docstring); a no-op on the meta device."""
        if self.lora_A.weight.is_meta:
            return
        if self.a_init == "reference":  # kaiming-uniform(a=sqrt(5)) with fan-in = rank
            bound = 1.0 / math.sqrt(self.rank)
            nn.init.uniform_(self.lora_A.weight, -bound, bound)
        else:  # kaiming-uniform(a=sqrt(5)) with fan-in = in_features
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """The plain-LoRA update that merge adds.

        Returns:
            torch.Tensor: ``scaling * B @ A`` with shape (out_features, in_features).
        """
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``W0 x + s * B(A(dropout(x)))`` with the scale of the module docstring.

        Args:
            x (torch.Tensor): input with shape (B, T, in_features).

        Returns:
            torch.Tensor: output with shape (B, T, out_features).
        """
        out = self.base(x)  # (B, T, out)
        if not self.enabled:
            if self.merged:
                raise RuntimeError("cannot disable LoRA while it is merged into the base weight; unmerge first")
            return out
        r = self.scale_vector
        if self.merged:
            if r is not None:
                raise RuntimeError("a per-utterance LoRA scale cannot be used with merged weights; unmerge first")
            return out
        update = self.lora_B(self.lora_A(self.dropout(x)))  # (B, T, out)
        if r is None:
            return out + update * self.scaling
        width = update.shape[-1] * self.scale_groups
        if r.dim() != 2 or r.shape[0] != x.shape[0] or r.shape[1] != width:
            raise ValueError(f"LoRA scale must be (batch={x.shape[0]}, {width}), got {tuple(r.shape)}")
        if self.scale_groups > 1:  # (B, kv * G * h) -> mean over the G query heads of each kv head
            r = r.view(r.shape[0], -1, self.scale_groups, self.scale_head_dim).mean(2).reshape(r.shape[0], -1)
        if self.scale_rows is not None:
            r = r[:, self.scale_rows]
        return out + update * r.to(update.dtype).unsqueeze(1)  # r: (B, 1, out)

    @torch.no_grad()
    def merge(self) -> None:
        """Add ``scaling * B A`` into the frozen weight (plain LoRA only) for fast inference; idempotent."""
        if not self.merged:
            self.base.weight.add_(self.delta_weight().to(self.base.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract what :meth:`merge` added; idempotent."""
        if self.merged:
            self.base.weight.sub_(self.delta_weight().to(self.base.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        """Rank, alpha and whether merged, in the module's repr."""
        return f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def rotary_meta_to_hf_rows(n_heads: int, out_features: int) -> torch.Tensor:
    """Row order taking a Meta-layout q/k projection output to the Hugging Face LLaMA layout.

    Meta's LLaMA rotates interleaved pairs ``(2i, 2i+1)`` of each head, Hugging Face's rotates halves
    ``(i, i + h/2)``; within each head of size ``h``, HF row ``j < h/2`` is Meta row ``2j`` and HF row
    ``h/2 + j`` is Meta row ``2j + 1``.

    Args:
        n_heads (int): heads of the projection.
        out_features (int): its output width (``n_heads * h``, ``h`` even).

    Returns:
        torch.Tensor: ``idx`` with shape (out_features,), ``hf = meta[idx]``.
    """
    if out_features % n_heads or (out_features // n_heads) % 2:
        raise ValueError(f"cannot split {out_features} q/k rows into {n_heads} heads of even size")
    h = out_features // n_heads
    within = torch.cat([torch.arange(0, h, 2), torch.arange(1, h, 2)])  # (h,)
    return (torch.arange(n_heads)[:, None] * h + within[None, :]).reshape(-1)


def inject_lora(
    model: nn.Module, target_names: Sequence[str], rank: int, alpha: float, dropout: float = 0.0,
    a_init: str = "reference",
) -> List[str]:
    """Replace every ``nn.Linear`` child whose attribute name is in ``target_names`` by a LoRALinear.

    Args:
        model (nn.Module): the model, changed in place.
        target_names (Sequence[str]): attribute names of the projections to wrap (``llm.LORA_TARGETS``).
        rank, alpha, dropout, a_init: :class:`LoRALinear`'s.

    Returns:
        List[str]: the qualified names of the wrapped modules.

    Raises:
        ValueError: if nothing matched (a wrong name list would otherwise train nothing silently).
    """
    wrapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in target_names and isinstance(child, nn.Linear):
                setattr(parent, child_name, LoRALinear(child, rank, alpha, dropout, a_init))
                wrapped.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    if not wrapped:
        raise ValueError(f"no nn.Linear named any of {list(target_names)} found for LoRA")
    return wrapped


def lora_modules(model: nn.Module) -> Iterator[LoRALinear]:
    """Every LoRA layer of ``model``, in module order.

    Args:
        model (nn.Module): the model.

    Yields:
        LoRALinear: each LoRA layer.
    """
    for m in model.modules():
        if isinstance(m, LoRALinear):
            yield m


def lora_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """The adapter parameters (every ``lora_A`` / ``lora_B`` weight), as torchtune's ``get_adapter_params``.

    Args:
        model (nn.Module): the model.

    Returns:
        Dict[str, nn.Parameter]: the parameters by qualified name.
    """
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def lora_scale_context(model: nn.Module, scale: Optional[torch.Tensor]):
    """Within the block every LoRA layer of ``model`` uses the per-utterance scale ``scale``.

    Args:
        model (nn.Module): the model.
        scale (Optional[torch.Tensor]): r with shape (B, D), or None for alpha / R.

    Returns:
        contextlib.AbstractContextManager: the context (the previous state is restored on exit).
    """
    mods = list(lora_modules(model))
    return _lora_state(mods, [(scale, m.enabled) for m in mods])


@contextlib.contextmanager
def _lora_state(mods: List[LoRALinear], state: List[tuple]):
    """Within the block each module has its (scale_vector, enabled) from ``state``; restored after."""
    previous = [(m.scale_vector, m.enabled) for m in mods]
    for m, (scale, enabled) in zip(mods, state):
        m.scale_vector, m.enabled = scale, enabled
    try:
        yield
    finally:
        for m, (scale, enabled) in zip(mods, previous):
            m.scale_vector, m.enabled = scale, enabled


def checkpoint_context_fn(model: nn.Module):
    """A ``context_fn`` for non-reentrant ``torch.utils.checkpoint``: the recomputation of a checkpointed
    layer (during backward, after :func:`lora_scale_context` / :func:`lora_disabled` have exited) runs
    with the LoRA state (per-utterance scale, enabled) that the layer's forward saw.

    Every piece of per-forward state of this package lives on LoRALinear (scale_vector, enabled);
    ``merged`` changes the weights themselves (an inference-time operation, not done between a forward
    and its backward), and dropout's random state is restored by ``checkpoint`` itself
    (``preserve_rng_state``).

    Args:
        model (nn.Module): the model whose LoRA layers are checkpointed.

    Returns:
        Callable[[], Tuple]: the ``context_fn``: (forward context, recomputation context).
    """
    mods = list(lora_modules(model))

    def context_fn():
        saved = [(m.scale_vector, m.enabled) for m in mods]
        return contextlib.nullcontext(), _lora_state(mods, saved)

    return context_fn


def lora_disabled(model: nn.Module):
    """Within the block the model is its frozen base (used for the prompt adapter's input).

    Args:
        model (nn.Module): the model.

    Returns:
        contextlib.AbstractContextManager: the context (the previous state is restored on exit).
    """
    mods = list(lora_modules(model))
    return _lora_state(mods, [(m.scale_vector, False) for m in mods])


def merge_lora(model: nn.Module) -> int:
    """Merge every LoRA layer into its base weight.

    Args:
        model (nn.Module): the model.

    Returns:
        int: how many were merged.
    """
    mods = list(lora_modules(model))
    for m in mods:
        m.merge()
    return len(mods)


def unmerge_lora(model: nn.Module) -> int:
    """Undo :func:`merge_lora`.

    Args:
        model (nn.Module): the model.

    Returns:
        int: how many LoRA layers there are.
    """
    mods = list(lora_modules(model))
    for m in mods:
        m.unmerge()
    return len(mods)
