"""Runs of the main job side by side: each run's score, the mean and the spread (largest minus smallest).

    python -m wavllm_fairseq.toy.compare work_real work_real_b [--stage stage2] [--out compare.md]

Each argument is a ``--work`` folder of ``python -m wavllm_fairseq.toy.pipeline`` (its ``results.json``);
runs that differ only in ``--train-seed`` measure the run-to-run spread of training. The table has one
row per (test set, task, metric) of the stage, then what the backbones scored alone and each run's wall
time.
"""
import argparse
import json
import os
import sys
from typing import List, Optional, Sequence

from .report import REAL_TARGETS, SKIP_METRICS, TARGETS


def _fmt(metric: str, v: Optional[float]) -> str:
    if v is None:
        return ""
    return f"{v:.2f}" if "wer" in metric or metric == "bleu" else f"{v:.3f}"


def compare(runs: Sequence[dict], names: Sequence[str], stage: str = "stage2") -> str:
    """The markdown table of ``runs`` (``results.json`` contents) at ``stage``.

    Args:
        runs (Sequence[dict]): each run's ``results.json``.
        names (Sequence[str]): a column title per run.
        stage (str): ``stage1`` or ``stage2``.

    Returns:
        str: the table, then the references and the wall times.
    """
    targets = REAL_TARGETS if runs[0].get("recipe") == "small_real" else TARGETS
    keys: List[tuple] = []
    for r in runs:
        for subset, per_task in r["results"].get(stage, {}).items():
            for task, metrics in per_task.items():
                keys += [(subset, task, m) for m in metrics if m not in SKIP_METRICS and (subset, task, m) not in keys]
    lines = ["| test set | task | metric | " + " | ".join(names) + " | mean | spread | target |",
             "|---|---|---|" + "---|" * (len(names) + 3)]
    for subset, task, metric in sorted(keys):
        vals = [r["results"].get(stage, {}).get(subset, {}).get(task, {}).get(metric) for r in runs]
        have = [v for v in vals if v is not None]
        mean = sum(have) / len(have) if have else None
        spread = max(have) - min(have) if len(have) > 1 else None
        target = targets.get((subset, task, metric), "")
        lines.append(f"| {subset} | {task} | {metric} | " + " | ".join(_fmt(metric, v) for v in vals)
                     + f" | {_fmt(metric, mean)} | {_fmt(metric, spread)} | {target} |")
    lines += ["", "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    refs = [r.get("references", {}) for r in runs]
    if any("whisper_wer" in x for x in refs):
        lines.append("| Whisper tiny.en alone, WER % on test_asr | "
                     + " | ".join(_fmt("wer", x.get("whisper_wer", {}).get("wer")) for x in refs) + " |")
    if any("llm_text_sqqa" in x for x in refs):
        lines.append("| SmolLM2 alone, test_sqqa questions as text, accuracy | "
                     + " | ".join(_fmt("accuracy", x.get("llm_text_sqqa", {}).get("accuracy")) for x in refs) + " |")
    steps = []
    for r in runs:
        steps += [s for s in r.get("times_s", {}) if s not in steps]
    for step in steps:
        lines.append(f"| wall time: {step} | "
                     + " | ".join(f"{r['times_s'][step] / 60:.1f} min" if step in r.get("times_s", {}) else ""
                                  for r in runs) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m wavllm_fairseq.toy.compare`` on ``argv``; returns the exit status (2: a run has no results)."""
    p = argparse.ArgumentParser(prog="python -m wavllm_fairseq.toy.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("works", nargs="+", help="--work folders of the pipeline")
    p.add_argument("--stage", default="stage2", choices=["stage1", "stage2"])
    p.add_argument("--out", default="", help="also write the table to this file")
    args = p.parse_args(argv)
    runs = []
    for w in args.works:
        path = os.path.join(w, "results.json")
        if not os.path.isfile(path):
            print(f"{path}: not found (has the pipeline finished in {w}?)", file=sys.stderr)
            return 2
        runs.append(json.load(open(path)))
    table = compare(runs, [os.path.basename(os.path.normpath(w)) for w in args.works], args.stage)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
