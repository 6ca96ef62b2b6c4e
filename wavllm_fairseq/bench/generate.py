"""Decoding speed, measured side by side in one run on the same weights and the same prefixes.

    wavllm-bench-generate [--arch wavllm_small] [--batch 1 8] [--new-tokens 64] [--repeats 3]
                          [--device cuda --dtype bfloat16 --arch wavllm_7b] [--hf-static]

Decoders start from the same left-padded speech+prompt prefix (speech encoding is done once and not
timed): our generator on its dynamic path (a growing key/value cache, Hugging Face's LLaMA forward per
step: the CPU default), our generator on its static path (static_decode.py: a preallocated cache and,
on CUDA, the step captured as a CUDA graph: the GPU default), the same static path with its layer step
run through ``torch.compile`` (``--decoders ... compiled``: fused element-wise kernels, captured as a
CUDA graph on CUDA; the first call compiles, outside the timed repeats), Hugging Face ``generate`` with
``inputs_embeds`` on the same LLM (dynamic cache; with ``--hf-static`` also
``cache_implementation="static"``, which compiles its step), and our generator without a key/value
cache (the whole sequence recomputed each step; ``--skip-uncached`` leaves it out).
Prefixes in a batch have different lengths (speech of 4-12 s, prompts of
20-60 tokens) and, as in real multi-task batches (a 3-token SV answer next to a 60-token
transcript), so do the answers: row b ends after ``n_b`` tokens, n_b spread evenly from
``--new-tokens / 4`` to ``--new-tokens`` (``--same-length`` makes every row ``--new-tokens`` long).
The end of each answer is imposed identically on all decoders (a logits processor for Hugging Face,
per-row length caps for ours), so they compute the same tokens; the script checks that they agree
token for token. Tokens/s counts answer tokens only.

The model is built with random weights directly on ``--device`` in ``--dtype`` (``wavllm_7b`` is
never materialised on the CPU). On CUDA the report adds the bandwidth limit at batch 1: every LLM
weight read once per token, ``bandwidth / bytes of the LLM``, and the fraction of it reached
(``--bandwidth-gbs``, known for H200 / H100 / A100 by name).

Reports tokens/s (best of ``--repeats``) and ratios; the last line is
``ratio_vs_hf_generate <our default path / HF dynamic at the largest batch>``.
"""
import argparse
import dataclasses
import json
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch

from ..decoding.generator import WavLLMGenerator
from ..decoding.options import DecodingOptions
from ..models.config import DTYPE_NAMES, DTYPES
from .synthetic import TargetDictionary, generation_prefixes, random_model

BANDWIDTH_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}  # HBM bandwidth by GPU name (vendor figures)


class _EndAt:
    """HF logits processor: row b may not end before n_b new tokens and must end at n_b."""

    def __init__(self, lengths, eos):
        self.lengths, self.eos, self.start = lengths, eos, None

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
        step = input_ids.shape[1] - self.start
        for b, n in enumerate(self.lengths):
            if step < n:
                scores[b, self.eos] = -float("inf")
            else:
                scores[b, :] = -float("inf")
                scores[b, self.eos] = 0.0
        return scores


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, repeats: int, device: str = "cpu"):
    """(best of ``repeats`` timed calls, its output, the untimed first call's time)."""
    best, out = float("inf"), None
    _sync(device)
    t = time.perf_counter()
    fn()  # warm-up (on CUDA: graph capture, autotuning; with a compiled step: compilation)
    _sync(device)
    first = time.perf_counter() - t
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out, first


def bandwidth_limit(model, device: str, gbs: float = 0.0):
    """The bandwidth limit of decoding at batch 1: every LLM weight read once per token.

    Args:
        model (WavLLMModel): the model (its LLM's parameters are counted)
        device (str): its device (no limit off CUDA)
        gbs (float): the memory bandwidth in GB/s (0: known by GPU name, ``BANDWIDTH_GBS``)

    Returns:
        Tuple[Optional[float], Optional[float]]: (tokens/s, GB/s used), or (None, None) off CUDA or when
        the bandwidth is not known
    """
    if not device.startswith("cuda"):
        return None, None
    if not gbs:
        name = torch.cuda.get_device_name()
        gbs = next((v for k, v in BANDWIDTH_GBS.items() if k in name), 0.0)
    if not gbs:
        return None, None
    nbytes = sum(p.numel() * p.element_size() for p in model.llm.parameters())
    return gbs * 1e9 / nbytes, gbs


def answer_lengths(N: int, B: int, same_length: bool = False) -> List[int]:
    """Per row, the answer length a benchmark imposes: ``N/4`` .. ``N`` spread evenly (all ``N`` alone or
    with ``same_length``).

    Args:
        N (int): the longest answer (``--new-tokens``)
        B (int): rows
        same_length (bool): every row ``N`` long

    Returns:
        List[int]: the lengths (B)
    """
    if same_length or B == 1:
        return [N] * B
    return [int(round(N / 4 + (N - N / 4) * b / (B - 1))) for b in range(B)]


def our_generators(model, N: int) -> Dict[str, WavLLMGenerator]:
    """Our decoders, each ending a row at its cap (at least and at most ``N`` new tokens unless capped lower):
    ``dynamic``, ``static``, ``compiled`` (static with a compiled step) and ``nocache``.

    Args:
        model (WavLLMModel): the model
        N (int): ``max_len_b`` and ``min_len``

    Returns:
        Dict[str, WavLLMGenerator]: the generators by name
    """
    base = DecodingOptions(max_len_b=N, min_len=N)
    kinds = {"dynamic": dict(static=False), "static": dict(static=True),
             "compiled": dict(static=True, compile_step=True), "nocache": dict(use_cache=False)}
    tgt = TargetDictionary(model.llm.config.eos_token_id)
    return {name: dataclasses.replace(base, **kw).build(model, tgt) for name, kw in kinds.items()}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wavllm-bench-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="wavllm_small")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    p.add_argument("--stage", type=int, choices=(1, 2), default=1, help="2: with the prompt-aware LoRA scale")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--same-length", action="store_true", help="every row generates --new-tokens tokens")
    p.add_argument("--skip-uncached", action="store_true", help="skip the (slow) no-cache loop")
    p.add_argument("--hf-static", action="store_true", help="also time HF generate with a static, compiled cache")
    p.add_argument("--decoders", nargs="+", default=["static", "dynamic", "hf"],
                   choices=("static", "compiled", "dynamic", "hf"),
                   help="which of ours static / ours static with a compiled step / ours dynamic / HF dynamic to time")
    p.add_argument("--bandwidth-gbs", type=float, default=0.0, help="memory bandwidth for the limit (GB/s)")
    p.add_argument("--json", default="", help="also write the results to this file")
    return p


def _runs(args, model, generators, prefix, lengths: List[int]) -> List[Tuple[str, Callable[[], list]]]:
    """(name, a call that decodes the prefix and returns each row's answer tokens), in the order timed."""
    eos, N = model.llm.config.eos_token_id, args.new_tokens

    def ours(kind):  # a row's cap closes it with </s> after n_b tokens
        return [h[0]["tokens"][:-1].tolist() for h in generators[kind].decode(prefix, lengths)]

    def hf(static=False):
        kw = {"cache_implementation": "static"} if static else {}
        with torch.no_grad():
            out = model.llm.generate(inputs_embeds=prefix.embeds, attention_mask=prefix.attention_mask,
                                     max_new_tokens=N, do_sample=False, num_beams=1, pad_token_id=0,
                                     eos_token_id=eos, logits_processor=[_EndAt(lengths, eos)], **kw)
        return [r[:n] for r, n in zip(out[:, -out.shape[1]:].tolist(), lengths)]

    graphs = " + cuda graphs" if args.device.startswith("cuda") else ""
    runs = [(name, fn) for key, name, fn in (
        ("static", "ours static" + graphs, lambda: ours("static")),
        ("compiled", "ours static compiled" + graphs, lambda: ours("compiled")),
        ("dynamic", "ours dynamic", lambda: ours("dynamic")), ("hf", "hf generate", hf)) if key in args.decoders]
    if args.hf_static:
        runs.append(("hf generate static", lambda: hf(True)))
    if not args.skip_uncached:
        runs.append(("ours (no cache)", lambda: ours("nocache")))
    return runs


def _time_runs(runs, repeats: int, device: str):
    """Time every run (a failing decoder is reported and left out): (best times, tokens, first-call times)."""
    times, toks, first = {}, {}, {}
    for name, fn in runs:
        try:
            times[name], toks[name], first[name] = _time(fn, repeats if "no cache" not in name else 1, device)
        except Exception as e:  # report the decoder that failed and go on with the others
            print(f"  {name}: failed: {type(e).__name__}: {str(e)[:300]}")
    return times, toks, first


def _report_batch(B: int, N: int, n_tokens: int, ours_name: str, times, toks, first, limit) -> dict:
    """Print one batch's speeds, ratios, fraction of the bandwidth limit and token agreement; its record."""
    for name, t in times.items():
        print(f"  {name:30s} {n_tokens / t:9.1f} tokens/s  ({t:.3f} s, {1000 * t / N:.1f} ms/step; "
              f"first call {first[name]:.1f} s)")
    rec = {"batch": B, "tokens_per_s": {k: n_tokens / t for k, t in times.items()},
           "first_call_s": first}
    for name in times:
        if name != ours_name and ours_name in times:
            print(f"  {ours_name} / {name}: {times[name] / times[ours_name]:.2f}x")
    compiled = next((n for n in times if n.startswith("ours static compiled")), None)
    if compiled and compiled != ours_name:  # the compiled step against every other decoder
        for name in times:
            if name != compiled:
                print(f"  {compiled} / {name}: {times[name] / times[compiled]:.2f}x")
    if limit and B == 1:
        fractions = {n: n_tokens / t / limit for n, t in times.items()}
        rec["fraction_of_bandwidth_limit_by_decoder"] = fractions
        if ours_name in fractions:
            rec["fraction_of_bandwidth_limit"] = fractions[ours_name]
        for n in (ours_name, compiled):
            if n in fractions:
                print(f"  {n}: {100 * fractions[n]:.0f}% of the bandwidth limit ({limit:.0f} tokens/s)")
    # tokens against the dynamic path, else HF, else the first decoder timed (nothing to compare: none)
    ref_name = next((n for n in ("ours dynamic", "hf generate", *toks) if n in toks), None)
    if ref_name is not None and len(toks) > 1:
        agree = {k: v == toks[ref_name] for k, v in toks.items() if k != ref_name}
        rec["identical_to_" + ref_name.replace(" ", "_")] = agree
        print(f"  identical tokens to {ref_name}: {agree}")
    return rec


def main(argv=None) -> int:
    """The command line (module docstring).

    Args:
        argv (Optional[List[str]]): the arguments (default: ``sys.argv[1:]``)

    Returns:
        int: the exit status
    """
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    model = random_model(args.arch, args.vocab, dev, DTYPES[args.dtype], args.stage)
    N = args.new_tokens
    limit, gbs = bandwidth_limit(model, dev, args.bandwidth_gbs)
    print(f"arch {args.arch} stage {args.stage}, LLM {sum(p.numel() for p in model.llm.parameters()) / 1e6:.1f}M "
          f"params, {args.dtype} on {dev}" + (f" ({torch.cuda.get_device_name()})" if dev.startswith("cuda") else "")
          + f", vocab {args.vocab}, {N} new tokens per row, torch threads {torch.get_num_threads()}")
    if limit:
        print(f"bandwidth limit at batch 1: {limit:.1f} tokens/s ({gbs:.0f} GB/s over the LLM's weights)")
    generators = our_generators(model, N)
    results, ratio_hf = [], None
    for B in args.batch:
        prefix = generation_prefixes(model, B, args.vocab, device=dev)
        lengths = answer_lengths(N, B, args.same_length)
        runs = _runs(args, model, generators, prefix, lengths)
        times, toks, first = _time_runs(runs, args.repeats, dev)
        ours_name = runs[0][0] if dev.startswith("cuda") else "ours dynamic"
        print(f"\nbatch {B} (prefix lengths {prefix.attention_mask.sum(1).tolist()}, answer lengths {lengths})")
        results.append(_report_batch(B, N, sum(lengths), ours_name, times, toks, first, limit))
        if ours_name in times and "hf generate" in times:
            ratio_hf = times["hf generate"] / times[ours_name]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "device": dev, "dtype": args.dtype, "limit_tokens_per_s": limit,
                       "results": results}, f, indent=1)
    if ratio_hf is not None:
        print(f"ratio_vs_hf_generate {ratio_hf:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
