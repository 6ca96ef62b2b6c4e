"""Decoding speed, measured side by side in one run on the same weights and the same prefixes.

    wavllm-bench-generate [--arch wavllm_small] [--batch 1 8] [--new-tokens 64] [--repeats 3]

Three decoders start from the same left-padded speech+prompt prefix (speech encoding is done once
and not timed): our cached generator (``generator.WavLLMGenerator``), Hugging Face ``generate`` with
``inputs_embeds`` on the same LLM, and our generator without a key/value cache (the whole sequence
recomputed each step). Prefixes in a batch have different lengths (speech of 4-12 s, prompts of
20-60 tokens) and, as in real multi-task batches (a 3-token SV answer next to a 60-token
transcript), so do the answers: row b ends after ``n_b`` tokens, n_b spread evenly from
``--new-tokens / 4`` to ``--new-tokens`` (``--same-length`` makes every row ``--new-tokens`` long).
The end of each answer is imposed identically on all decoders (a logits processor for Hugging Face,
per-row length caps for ours), so they compute the same tokens; the script checks that they agree
token for token. Tokens/s counts answer tokens only.

Reports tokens/s (best of ``--repeats``) and ratios; the last line is
``ratio_vs_hf_generate <ours / HF at the largest batch>``.
"""
import argparse
import sys
import time
from typing import List

import torch


def _prefixes(model, batch: int, vocab: int, seed: int = 0):
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


def _time(fn, repeats: int):
    best, out = float("inf"), None
    fn()  # warm-up
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="wavllm-bench-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="wavllm_small")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--same-length", action="store_true", help="every row generates --new-tokens tokens")
    p.add_argument("--skip-uncached", action="store_true", help="skip the (slow) no-cache loop")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from .generator import WavLLMGenerator
    from .model import WavLLMModel

    torch.manual_seed(0)
    model = WavLLMModel.from_arch(args.arch, vocab_size=args.vocab).eval()
    with torch.no_grad():  # a non-zero LoRA, as after training
        for n, prm in model.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.02)
    eos = model.llm.config.eos_token_id
    N = args.new_tokens
    print(f"arch {args.arch}, LLM {sum(p.numel() for p in model.llm.parameters()) / 1e6:.1f}M params, "
          f"vocab {args.vocab}, {N} new tokens per row, torch threads {torch.get_num_threads()}")
    ratio_hf = None
    for B in args.batch:
        prefix = _prefixes(model, B, args.vocab)
        ids = list(range(B))
        lengths = [N] * B if args.same_length or B == 1 else [
            int(round(N / 4 + (N - N / 4) * b / (B - 1))) for b in range(B)]
        n_tokens = sum(lengths)

        def ours(cache=True):
            g = WavLLMGenerator([model], _Dict(eos), max_len_b=N, min_len=N, use_cache=cache)
            g._cap_is_task = [False] * B
            with torch.no_grad():  # a row's cap closes it with </s> after n_b tokens
                return [h[0]["tokens"][:-1].tolist() for h in g._greedy(prefix, lengths, ids)]

        def hf():
            with torch.no_grad():
                out = model.llm.generate(inputs_embeds=prefix.embeds, attention_mask=prefix.attention_mask,
                                         max_new_tokens=N, do_sample=False, num_beams=1, pad_token_id=0,
                                         eos_token_id=eos, logits_processor=[_EndAt(lengths, eos)])
            return [r[:n] for r, n in zip(out[:, -out.shape[1]:].tolist(), lengths)]

        t_ours, tok_ours = _time(ours, args.repeats)
        t_hf, tok_hf = _time(hf, args.repeats)
        rows = [("ours (kv cache)", t_ours), ("hf generate", t_hf)]
        agree = tok_ours == tok_hf
        if not args.skip_uncached:
            t_nc, tok_nc = _time(lambda: ours(cache=False), max(1, args.repeats - 2))
            rows.append(("ours (no cache)", t_nc))
            agree = agree and tok_nc == tok_ours
        print(f"\nbatch {B} (prefix lengths {prefix.attention_mask.sum(1).tolist()}, answer lengths {lengths})")
        for name, t in rows:
            print(f"  {name:18s} {n_tokens / t:9.1f} tokens/s  ({t:.3f} s)")
        print(f"  ours / hf generate   {t_hf / t_ours:.2f}x")
        if not args.skip_uncached:
            print(f"  ours / no cache      {rows[2][1] / t_ours:.2f}x")
        print(f"  identical tokens across decoders: {agree}")
        ratio_hf = t_hf / t_ours
    print(f"ratio_vs_hf_generate {ratio_hf:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
