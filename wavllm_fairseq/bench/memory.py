"""Memory of one training step with and without activation checkpointing / bf16, measured side by side.

    python -m wavllm_fairseq.bench.memory [--arch wavllm_small] [--batch 8] [--seconds 10] [--text 64]

Each setting runs in a fresh subprocess (peak RSS only grows within a process): build the model with
random weights, take the resident set size, run one forward + backward of a training batch, and
report the peak RSS growth during the step (activations + gradients + temporaries). On a GPU
(``--device cuda``) the same script reports ``torch.cuda.max_memory_allocated`` instead.
"""
import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from ..models.wavllm import WavLLMModel
from .synthetic import PRE_TOKENS, training_net_input

VOCAB = 32000


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _child(arch: str, batch: int, seconds: float, text: int, ckpt: bool, bf16: bool, device: str) -> dict:
    """One setting, measured in this (fresh) process: the row of the table."""
    torch.manual_seed(0)
    model = WavLLMModel.from_arch(arch, vocab_size=VOCAB, activation_checkpointing=ckpt).to(device)
    model.train()
    T = int(seconds * 16000)
    net = training_net_input(batch, seconds, text, VOCAB, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mb()
    t = time.time()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        logits, target, _ = model(**net)
        loss = torch.nn.functional.cross_entropy(logits.float(), target)
    loss.backward()
    step_s = time.time() - t
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    seq = PRE_TOKENS + int(model.speech_frames(torch.tensor([T]))[0]) + text
    return {"activation_checkpointing": ckpt, "bf16": bf16, "base_mb": round(base, 1),
            "step_peak_growth_mb": round(peak - base, 1), "step_seconds": round(step_s, 2), "llm_seq_len": seq}


def main(argv=None) -> int:
    """The command line (module docstring).

    Args:
        argv (Optional[List[str]]): the arguments (default: ``sys.argv[1:]``)

    Returns:
        int: the exit status
    """
    p = argparse.ArgumentParser(prog="python -m wavllm_fairseq.bench.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="wavllm_small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0, help="audio per utterance")
    p.add_argument("--text", type=int, default=64, help="post-speech tokens per utterance (half are targets)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        ckpt, bf16 = (x == "1" for x in args.child.split(","))
        print(json.dumps(_child(args.arch, args.batch, args.seconds, args.text, ckpt, bf16, args.device)))
        return 0
    rows = []
    for ckpt, bf16 in ((False, False), (True, False), (False, True), (True, True)):
        cmd = [sys.executable, "-m", "wavllm_fairseq.bench.memory", "--arch", args.arch, "--batch", str(args.batch),
               "--seconds", str(args.seconds), "--text", str(args.text), "--device", args.device,
               "--child", f"{int(ckpt)},{int(bf16)}"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    unit = "CUDA MB" if args.device == "cuda" else "MB peak RSS growth"
    print(f"{args.arch}, batch {args.batch} x {args.seconds:g} s audio + {args.text} text tokens "
          f"(LLM sequence {rows[0]['llm_seq_len']}), one forward+backward on {args.device}")
    print(f"{'activation ckpt':>16} {'bf16 autocast':>14} {unit:>20} {'step s':>8}")
    for r in rows:
        print(f"{str(r['activation_checkpointing']):>16} {str(r['bf16']):>14} {r['step_peak_growth_mb']:>20.1f} "
              f"{r['step_seconds']:>8.2f}")
    full = rows[0]["step_peak_growth_mb"]
    for r in rows[1:]:
        print(f"saving_vs_fp32_no_ckpt ckpt={int(r['activation_checkpointing'])} bf16={int(r['bf16'])} "
              f"{1 - r['step_peak_growth_mb'] / full:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
