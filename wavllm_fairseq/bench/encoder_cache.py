"""Stage-1 training step time with live encoders and through an encoder cache, side by side in one run.

    python -m wavllm_fairseq.bench.encoder_cache [--archs wavllm_small_real wavllm_small] [--batch 8]
        [--seconds 3] [--text 40] [--steps 4] [--dtype float16] [--bf16]

For each architecture (``wavllm_small_real``: Whisper tiny.en + SmolLM2-135M shapes; ``wavllm_small``: the
toy's stand-in sizes), random weights of the real shapes (the time does not depend on the values): the
same batch of ``--batch`` clips of ``--seconds`` s trains ``--steps`` steps (forward, backward, Adam) with
the encoders run every step, then with their outputs read from a cache filled beforehand (in a temporary
folder). It prints seconds per step of each and ``ratio_<arch> <live / cached>``.
"""
import argparse
import tempfile
import time
from typing import Dict

import torch

from ..data.encoder_cache import STORE_DTYPES, attach_encoder_cache
from .synthetic import PRE_TOKENS, random_model, training_net_input

VOCABS = {"wavllm_small_real": 49152, "wavllm_small": 32000, "wavllm_tiny": 100}


def step_seconds(model, net: dict, steps: int, bf16: bool) -> float:
    """Mean seconds of a training step (after one untimed step).

    Args:
        model (WavLLMModel): the model, in train mode.
        net (dict): a training batch's ``net_input`` (bench/synthetic.py).
        steps (int): timed steps.
        bf16 (bool): run forward and backward under bfloat16 autocast.

    Returns:
        float: seconds per step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, target, _ = model(**net)
            loss = torch.nn.functional.cross_entropy(logits.float(), target)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def compare(arch: str, args) -> Dict[str, float]:
    """Live and cached step time of one architecture.

    Args:
        arch (str): a named architecture.
        args (argparse.Namespace): the command line.

    Returns:
        Dict[str, float]: ``live_s``, ``cached_s``, ``ratio`` and ``llm_positions`` (sequence length).
    """
    vocab = VOCABS.get(arch, 32000)
    model = random_model(arch, vocab, "cpu", torch.float32).train()
    torch.manual_seed(0)
    net = training_net_input(args.batch, args.seconds, args.text, vocab, "cpu")
    live = step_seconds(model, net, args.steps, args.bf16)
    with tempfile.TemporaryDirectory() as tmp:
        cache = attach_encoder_cache(model, tmp, args.dtype)
        with torch.no_grad():
            model.encode_speech(net["audio"], net["audio_lengths"])  # fills it
        cached = step_seconds(model, net, args.steps, args.bf16)
        assert cache.stats["misses"] == args.batch, cache.summary()  # only the filling pass encoded
        model.encoder_cache = None
    n_speech = int(model.speech_frames(net["audio_lengths"][:1])[0])
    return {"live_s": live, "cached_s": cached, "ratio": live / cached,
            "llm_positions": PRE_TOKENS + n_speech + args.text}


def main(argv=None) -> int:
    """Console entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m wavllm_fairseq.bench.encoder_cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["wavllm_small_real", "wavllm_small"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=3.0, help="audio per clip (the toy corpora: 2-4 s)")
    p.add_argument("--text", type=int, default=40, help="post-speech tokens per row (half of them answer)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--dtype", choices=STORE_DTYPES, default="float16", help="what the cache stores")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for forward and backward")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch} x {args.seconds} s, "
          f"{args.text} post-speech tokens, {args.steps} steps, cache {args.dtype}, bf16 {args.bf16}")
    print(f"{'arch':<20} {'LLM positions':>13} {'live s/step':>12} {'cached s/step':>14} {'live/cached':>11}")
    results = {arch: compare(arch, args) for arch in args.archs}
    for arch, r in results.items():
        print(f"{arch:<20} {r['llm_positions']:>13} {r['live_s']:>12.3f} {r['cached_s']:>14.3f} {r['ratio']:>10.2f}x")
    for arch, r in results.items():
        print(f"ratio_{arch} {r['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
