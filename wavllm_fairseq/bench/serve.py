"""``wavllm-bench-serve``: the continuous scheduler against the batch-at-a-time one, under Poisson arrivals.

    wavllm-bench-serve [--checkpoint C] [--manifest M] [--requests 40] [--rates 2,4,8,inf]
                       [--max-tokens 16,32,64,128,256] [--max-batch 8] [--max-wait-ms 20] [--threads N]

Starts ``wavllm-serve`` twice on a free loopback port, ``--scheduler batch`` (today's: requests arriving
within ``--max-wait-ms`` decode together to the end) and ``--scheduler continuous`` (requests join the
running batch between steps), and sends each, at every rate of ``--rates`` (requests/s; inf: all at
once), the same ``--requests`` greedy streamed chat requests at Poisson arrival times (open loop), with
answer caps drawn from ``--max-tokens`` (mixed lengths; the loop guard is off, so an answer runs to its cap
unless it ends itself). It prints one row per rate and scheduler, side by side: requests/s, answer tokens/s
(answer tokens over the seconds from the first arrival to the last answer), time to first token and
latency p50 / p99 (seconds, as the clients measured them); then whether every answer was the same in every
run (``answers_equal``), whether continuous had the lower latency p99 at every rate, and last
``throughput_gain <float>``: continuous over batch tokens/s at the highest rate (saturation). Clips come
from ``--manifest`` (an instruction TSV, e.g. the toy corpus's ``test_asr.tsv``) or are synthesized tones
of 0.5-3 s; without ``--checkpoint`` a tiny random checkpoint (:func:`~.serve_process.tiny_checkpoint`) is
built in a temporary folder.
"""
import argparse
import math
import sys
import tempfile
from typing import Dict, List

import numpy as np

from .serve_load import Outcome, chat_body, open_loop, poisson_offsets, run_load
from .serve_process import ServerProcess, manifest_clips, presets, tiny_checkpoint, tone_clips

SCHEDULERS = ("batch", "continuous")


def _pct(xs: List[float], q: float) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def summary(outcomes: List[Outcome], wall: float) -> Dict[str, float]:
    """The figures of one run.

    Args:
        outcomes (List[Outcome]): its requests
        wall (float): seconds from the first arrival to the last answer

    Returns:
        Dict[str, float]: req_s, tokens_s, ttft_p50, ttft_p99, latency_p50, latency_p99
    """
    ttft, lat = [o.ttft for o in outcomes], [o.latency for o in outcomes]
    return {"req_s": len(outcomes) / wall, "tokens_s": sum(o.tokens for o in outcomes) / wall,
            "ttft_p50": _pct(ttft, 50), "ttft_p99": _pct(ttft, 99), "latency_p50": _pct(lat, 50),
            "latency_p99": _pct(lat, 99)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wavllm-bench-serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="default: a tiny random checkpoint built in a temp folder")
    p.add_argument("--manifest", default=None, help="instruction TSV whose clips and prompts to send")
    p.add_argument("--requests", type=int, default=40, help="requests per rate")
    p.add_argument("--rates", default="2,4,8,inf", help="comma-separated arrival rates, requests/s (inf: a burst)")
    p.add_argument("--max-tokens", default="16,32,64,128,256", help="answer caps, drawn uniformly per request")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=20.0, help="the batch scheduler's")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the server")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the caps and the arrival times")
    return p


def _bodies(args) -> List[dict]:
    if args.manifest:
        pairs = manifest_clips(args.manifest, args.requests)
    else:
        prompts = presets()
        pairs = [(c, prompts[i % len(prompts)]) for i, c in enumerate(tone_clips(args.requests, seed=args.seed))]
    caps = [int(c) for c in args.max_tokens.split(",")]
    drawn = np.random.default_rng(args.seed).choice(caps, len(pairs)).tolist()
    return [chat_body(a, q, n) for (a, q), n in zip(pairs, drawn)]


def _measure(ckpt: str, scheduler: str, bodies: List[dict], rates: List[float], args) -> Dict[float, tuple]:
    """{rate: (outcomes, wall)} of one scheduler's server."""
    extra = ["--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
    runs = {}
    with ServerProcess(ckpt, "--scheduler", scheduler, "--max-batch", str(args.max_batch), "--max-wait-ms",
                       str(args.max_wait_ms), "--loop-guard-ngram", "0", *extra) as srv:
        run_load(srv.url, bodies[: min(4, len(bodies))], 2)  # warm-up
        for i, rate in enumerate(rates):
            runs[rate] = open_loop(srv.url, bodies, poisson_offsets(len(bodies), rate, seed=args.seed + i))
    return runs


def main(argv=None) -> int:
    """The command line (module docstring).

    Args:
        argv (Optional[List[str]]): the arguments (default: ``sys.argv[1:]``)

    Returns:
        int: the exit status (1 if a request failed or answers differed)
    """
    p = _parser()
    args = p.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    if args.requests < 1 or not rates or any(r <= 0 for r in rates):
        p.error("--requests must be >= 1 and every rate > 0")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or tiny_checkpoint(tmp)
        bodies = _bodies(args)
        runs = {s: _measure(ckpt, s, bodies, rates, args) for s in SCHEDULERS}
    print(f"{'rate':>6s} {'scheduler':10s} {'req/s':>7s} {'tokens/s':>9s} {'ttft_p50':>9s} {'ttft_p99':>9s} "
          f"{'lat_p50':>8s} {'lat_p99':>8s}")
    answers, failed, figures = set(), 0, {}
    for rate in rates:
        for s in SCHEDULERS:
            outcomes, wall = runs[s][rate]
            failed += sum(o.status != 200 or bool(o.error) for o in outcomes)
            answers.add(tuple(o.text for o in outcomes))
            f = figures[s, rate] = summary(outcomes, wall)
            print(f"{rate:6g} {s:10s} {f['req_s']:7.2f} {f['tokens_s']:9.1f} {f['ttft_p50']:9.3f} "
                  f"{f['ttft_p99']:9.3f} {f['latency_p50']:8.3f} {f['latency_p99']:8.3f} requests={len(outcomes)}",
                  flush=True)
    if failed:
        print(f"failed_requests {failed}", file=sys.stderr)
    lower = all(figures["continuous", r]["latency_p99"] < figures["batch", r]["latency_p99"] for r in rates)
    top = max(rates)
    print(f"answers_equal {len(answers) == 1}")
    print(f"p99_lower_at_every_rate {lower}")
    print(f"throughput_gain {figures['continuous', top]['tokens_s'] / figures['batch', top]['tokens_s']:.3f}")
    return 0 if len(answers) == 1 and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
