"""``wavllm-count-params ARCH [--stage 1|2]``: parameter counts of a named architecture.

The model is built on the meta device (no weights, no memory), so the full-size ``wavllm_7b``
is counted without its weights. Prints total and trainable parameters per group, then the lines
``total <int>``, ``trainable <int>`` (the paper's count) and ``optimised <int>`` (what gets gradients:
trainable less the reference's unused Whisper-only projector, see trainability.trainable_groups).
"""
import argparse
import logging
import sys
from typing import Dict, List, Optional, Sequence

from ..models.architectures import ARCHITECTURES
from ..models.lora import lora_modules
from ..models.trainability import is_optimised
from ..models.wavllm import build_on_meta

# the paper's stage-1 figure, and how the reference implementation's parameters add up to it
PAPER_STAGE1_TRAINABLE = 76_636_941


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def breakdown(model) -> List[str]:
    """Human-readable lines explaining the trainable total component by component.

    Args:
        model (WavLLMModel): the model (on the meta device is enough).

    Returns:
        List[str]: one line per component.
    """
    lines = []
    for name, adapter in (("semantic adapter", model.semantic_adapter), ("acoustic adapter", model.acoustic_adapter)):
        if adapter is None:
            continue
        parts = [f"convs {_numel(adapter.subsampler):,}", f"bottleneck {_numel(adapter.bottleneck):,}",
                 f"linear {_numel(adapter.out_proj):,}"]
        if adapter.layer_weights is not None:
            parts.append(f"{adapter.layer_weights.numel()} layer weights")
        lines.append(f"  {name:<26} {_numel(adapter):>14,}  ({', '.join(parts)})")
    if model.projector is not None:
        p = model.projector
        lines.append(f"  {'projector':<26} {_numel(p):>14,}  (Linear {p.in_features}->{p.out_features})")
    if model.semantic_only_projector is not None:
        p = model.semantic_only_projector
        why = ("held by the reference implementation but unused while WavLM is on; kept for checkpoint "
               "compatibility" if model.wavlm is not None else "the Whisper-only projection")
        lines.append(f"  {'semantic-only projector':<26} {_numel(p):>14,}  "
                     f"(Linear {p.in_features}->{p.out_features}: {why})")
    lora = sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in _lora(model))
    n_mod = len(list(_lora(model)))
    lines.append(f"  {'LoRA':<26} {lora:>14,}  ({n_mod} projections (q,k,v,o x {model.llm.config.num_hidden_layers} "
                 f"layers), rank {model.cfg.lora_rank})")
    if model.prompt_scale is not None:
        lines.append(f"  {'prompt adapter':<26} {_numel(model.prompt_scale):>14,}  (P_d, P_u, W_A; stage 2)")
    return lines


def _lora(model):
    return lora_modules(model.llm)


def count(arch: str, stage: int, vocab_size: Optional[int] = None) -> Dict[str, int]:
    """The parameter counts of a named architecture, built on the meta device.

    Args:
        arch (str): the named architecture.
        stage (int): 1 or 2 (stage 2 adds the prompt adapter).
        vocab_size (Optional[int]): the vocabulary of archs that take it from the tokenizer.

    Returns:
        Dict[str, int]: ``model`` (the built model), ``groups`` (parameters per group), ``total``,
        ``trainable`` (the paper's count) and ``optimised`` (what gets gradients).
    """
    model = build_on_meta(arch, stage=stage, vocab_size=vocab_size)
    counts = {g: n for g, (_, n) in model.trainable_counts.items()}
    return {"model": model, "groups": counts,
            "total": sum(counts.values()),
            "trainable": sum(n for g, n in counts.items() if not g.startswith("frozen:")),
            "optimised": sum(n for g, n in counts.items() if is_optimised(g))}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``wavllm-count-params`` on ``argv`` (default: ``sys.argv[1:]``);
    returns the exit status (2 for an unknown architecture)."""
    parser = argparse.ArgumentParser(prog="wavllm-count-params", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arch", help="named architecture: wavllm_7b, wavllm_small, wavllm_tiny")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=1)
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="vocabulary for archs that take it from the tokenizer (wavllm_tiny; default 1000)")
    args = parser.parse_args(argv)
    logging.getLogger("wavllm_fairseq").setLevel(logging.WARNING)
    if args.arch not in ARCHITECTURES:
        print(f"unknown architecture {args.arch!r}; choose from {sorted(ARCHITECTURES)}", file=sys.stderr)
        return 2
    vocab = args.vocab_size
    if vocab is None and (ARCHITECTURES[args.arch].get("llama_vocab_size") or -1) <= 0:
        vocab = 1000
    res = count(args.arch, args.stage, vocab)
    model = res["model"]
    print(f"{args.arch} stage {args.stage} (counted on the meta device)")
    print("parameters per group:")
    for group, n in res["groups"].items():
        state = {"frozen": "frozen   ", "unused": "unused   "}.get(group.split(":")[0], "trainable")
        print(f"  {state} {group.split(':')[-1]:<30} {n:>15,}")
    print("trainable breakdown:")
    for line in breakdown(model):
        print(line)
    if args.arch in ("wavllm_7b", "wavllm") and args.stage == 1:
        same = "matches" if res["trainable"] == PAPER_STAGE1_TRAINABLE else "DIFFERS FROM"
        print(f"paper: 76.6M trainable of 7.55B; this count {same} the reference's {PAPER_STAGE1_TRAINABLE:,} "
              f"and totals {res['total'] / 1e9:.3f}B")
    if res["optimised"] != res["trainable"]:
        print("unused: the reference's Whisper-only projector is trainable there (so counted in 'trainable', as the "
              "paper counts it) but unused while WavLM is on: it gets no gradient, so it is held frozen "
              "(requires_grad=False: no optimizer state, no DDP reduction) and saved unchanged")
    print(f"total {res['total']}")
    print(f"trainable {res['trainable']}")
    print(f"optimised {res['optimised']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
