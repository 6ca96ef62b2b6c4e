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
import json
import sys
import time

import torch

from ..decoding.generator import WavLLMGenerator
from ..models.wavllm import WavLLMModel


BANDWIDTH_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}  # HBM bandwidth by GPU name (vendor figures)


def _prefixes(model, batch: int, vocab: int, seed: int = 0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    secs = torch.linspace(4.0, 12.0, batch) if batch > 1 else torch.tensor([8.0])
    audio_len = (secs * 16000).long()
    pre_len = torch.full((batch,), 45)
    post_len = torch.linspace(20, 60, batch).long() if batch > 1 else torch.tensor([40])
    audio = torch.zeros(batch, int(audio_len.max()))
    for b in range(batch):
        audio[b, : audio_len[b]] = 0.1 * torch.randn(int(audio_len[b]), generator=g)
    net = dict(audio=audio, audio_lengths=audio_len,
               pre_tokens=torch.randint(3, vocab, (batch, 45), generator=g), pre_lengths=pre_len,
               post_tokens=torch.randint(3, vocab, (batch, int(post_len.max())), generator=g), post_lengths=post_len,
               instruction_tokens=torch.randint(3, vocab, (batch, 8), generator=g),
               instruction_lengths=torch.full((batch,), 8))
    net = {k: v.to(device) for k, v in net.items()}
    with torch.no_grad():
        return model.build_generation_prefix(net)


class _Dict:
    def __init__(self, eos):
        self._eos = eos

    def eos(self):
        return self._eos

    def pad(self):
        return 0


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


def build(arch: str, vocab: int, device: str, dtype: torch.dtype, stage: int = 1):
    """A random-weight model built directly on ``device`` in ``dtype``, with a non-zero LoRA."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = WavLLMModel.from_arch(arch, vocab_size=vocab, prompt_adapter=stage == 2).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # a non-zero LoRA, as after training
        for n, prm in model.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.02)
    return model


def bandwidth_limit(model, device: str, gbs: float = 0.0):
    """(tokens/s at batch 1 if every LLM weight is read once per token, GB/s used) or (None, None)."""
    if not device.startswith("cuda"):
        return None, None
    if not gbs:
        name = torch.cuda.get_device_name()
        gbs = next((v for k, v in BANDWIDTH_GBS.items() if k in name), 0.0)
    if not gbs:
        return None, None
    nbytes = sum(p.numel() * p.element_size() for p in model.llm.parameters())
    return gbs * 1e9 / nbytes, gbs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="wavllm-bench-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="wavllm_small")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
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
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    dev = args.device
    model = build(args.arch, args.vocab, dev, getattr(torch, args.dtype), args.stage)
    eos = model.llm.config.eos_token_id
    N = args.new_tokens
    limit, gbs = bandwidth_limit(model, dev, args.bandwidth_gbs)
    print(f"arch {args.arch} stage {args.stage}, LLM {sum(p.numel() for p in model.llm.parameters()) / 1e6:.1f}M "
          f"params, {args.dtype} on {dev}" + (f" ({torch.cuda.get_device_name()})" if dev.startswith("cuda") else "")
          + f", vocab {args.vocab}, {N} new tokens per row, torch threads {torch.get_num_threads()}")
    if limit:
        print(f"bandwidth limit at batch 1: {limit:.1f} tokens/s ({gbs:.0f} GB/s over the LLM's weights)")
    default_static = dev.startswith("cuda")
    generators = {"dynamic": WavLLMGenerator([model], _Dict(eos), max_len_b=N, min_len=N, static=False),
                  "static": WavLLMGenerator([model], _Dict(eos), max_len_b=N, min_len=N, static=True),
                  "compiled": WavLLMGenerator([model], _Dict(eos), max_len_b=N, min_len=N, static=True,
                                              compile_step=True),
                  "nocache": WavLLMGenerator([model], _Dict(eos), max_len_b=N, min_len=N, use_cache=False)}
    results, ratio_hf = [], None
    for B in args.batch:
        prefix = _prefixes(model, B, args.vocab, device=dev)
        ids = list(range(B))
        lengths = [N] * B if args.same_length or B == 1 else [
            int(round(N / 4 + (N - N / 4) * b / (B - 1))) for b in range(B)]
        n_tokens = sum(lengths)

        def ours(kind):
            g = generators[kind]
            g._cap_is_task = [False] * B
            with torch.no_grad():  # a row's cap closes it with </s> after n_b tokens
                return [h[0]["tokens"][:-1].tolist() for h in g._greedy(prefix, lengths, ids)]

        def hf(static=False):
            kw = {"cache_implementation": "static"} if static else {}
            with torch.no_grad():
                out = model.llm.generate(inputs_embeds=prefix.embeds, attention_mask=prefix.attention_mask,
                                         max_new_tokens=N, do_sample=False, num_beams=1, pad_token_id=0,
                                         eos_token_id=eos, logits_processor=[_EndAt(lengths, eos)], **kw)
            return [r[:n] for r, n in zip(out[:, -out.shape[1]:].tolist(), lengths)]

        graphs = " + cuda graphs" if default_static else ""
        runs = [(name, fn) for key, name, fn in (
            ("static", "ours static" + graphs, lambda: ours("static")),
            ("compiled", "ours static compiled" + graphs, lambda: ours("compiled")),
            ("dynamic", "ours dynamic", lambda: ours("dynamic")), ("hf", "hf generate", hf)) if key in args.decoders]
        if args.hf_static:
            runs.append(("hf generate static", lambda: hf(True)))
        if not args.skip_uncached:
            runs.append(("ours (no cache)", lambda: ours("nocache")))
        times, toks, first = {}, {}, {}
        for name, fn in runs:
            try:
                times[name], toks[name], first[name] = _time(fn, args.repeats if "no cache" not in name else 1, dev)
            except Exception as e:  # report the decoder that failed and go on with the others
                print(f"  {name}: failed: {type(e).__name__}: {str(e)[:300]}")
        ours_name = runs[0][0] if default_static else "ours dynamic"
        print(f"\nbatch {B} (prefix lengths {prefix.attention_mask.sum(1).tolist()}, answer lengths {lengths})")
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
        results.append(rec)
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
