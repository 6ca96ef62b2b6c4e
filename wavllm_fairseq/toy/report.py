"""The toy pipeline's report: one table (stage 1 vs stage 2, seen/unseen prompts), JSON, and PNG plots."""
import json
import os
import re
import time
from typing import Dict, List, Optional

# the toy's targets on the held-out toy sets (checked after stage 2 unless said otherwise)
TARGETS = {
    ("test_asr", "asr", "wer"): "<= 20",
    ("test_st", "st", "bleu"): ">= 40",
    ("test_sv", "sv", "accuracy"): ">= 0.85",
    ("test_er", "er", "accuracy"): ">= 0.85",
    ("test_gender", "gender", "accuracy"): ">= 0.95",
    ("test_multi", "multi", "ifr"): ">= 0.9 (and > stage 1)",
    ("test_asr_unseen", "asr", "wer"): "within 3 of test_asr",
}

# the real small recipe's targets (issue 31): Whisper's own WER and the LLM's text accuracy are the references
REAL_TARGETS = {
    ("test_asr", "asr", "wer"): "within 3 of Whisper tiny.en alone",
    ("test_asr", "asr", "wer_unseen"): "within 3 of seen",
    ("test_st", "st", "bleu"): ">= 40",
    ("test_sv", "sv", "accuracy"): ">= 0.9",
    ("test_er", "er", "accuracy"): ">= 0.85",
    ("test_gender", "gender", "accuracy"): ">= 0.95",
    ("test_sqa", "sqa", "accuracy"): ">= 0.85",
    ("test_sqqa", "sqqa", "accuracy"): ">= the LLM on the questions as text - 0.10",
    ("test_multi", "multi", "ifr"): ">= 0.9 (and > stage 1)",
    ("test_multi", "multi", "ifr_seen"): ">= 0.9",
    ("test_multi", "multi", "ifr_unseen"): ">= 0.9",
}

SKIP_METRICS = {"n", "missing"}


def _rows(results: Dict[str, Dict[str, Dict[str, Dict[str, float]]]]) -> List[tuple]:
    keys = []
    for stage in results.values():
        for subset, per_task in stage.items():
            for task, metrics in per_task.items():
                for metric in metrics:
                    if metric not in SKIP_METRICS and (subset, task, metric) not in keys:
                        keys.append((subset, task, metric))
    return sorted(keys)


# held-out checks of the stage-0 stand-in backbones on their own (keys of stage0.json)
STANDIN_CHECKS = [("whisper_ctc_wer_valid", "Whisper stand-in: CTC greedy WER % (valid_asr)"),
                  ("wavlm_style_acc_valid", "WavLM stand-in: style accuracy, own head (valid_er)"),
                  ("wavlm_gender_acc_valid", "WavLM stand-in: gender accuracy, own head (valid_er)"),
                  ("wavlm_sv_acc_valid", "WavLM stand-in: same/different speaker accuracy, own clip head (valid_sv)"),
                  ("wavlm_change_acc_valid",
                   "WavLM stand-in: same/different speaker accuracy, own frame head (valid_sv)"),
                  ("llama_valid_ppl", "LLaMA stand-in: perplexity (held-out chat rows)"),
                  ("llama_copy_loss_valid", "LLaMA stand-in: answer loss, transcript in the speech span (valid_asr)"),
                  ("llama_nocopy_loss_valid", "LLaMA stand-in: answer loss, empty speech span (valid_asr)"),
                  ("llama_tag_loss_valid", "LLaMA stand-in: style/gender/SV answer loss, tags in the span"),
                  ("llama_notag_loss_valid", "LLaMA stand-in: style/gender/SV answer loss, words only in the span")]


def format_table(results, times, standins: Optional[dict] = None, refs: Optional[dict] = None,
                 recipe: str = "toy") -> str:
    """The pipeline's markdown report: scores per stage with the targets, references, stand-in checks, wall times.

    Args:
        results (Dict[str, dict]): {stage: {subset: {task: {metric: value}}}}.
        times (Dict[str, float]): step -> seconds.
        standins (Optional[dict]): stage 0's result (its held-out checks).
        refs (Optional[dict]): what the real backbones score alone (references.py).
        recipe (str): ``toy`` or ``small_real`` (whose targets the table shows).

    Returns:
        str: the tables.
    """
    targets = REAL_TARGETS if recipe == "small_real" else TARGETS
    stages = sorted(results)
    lines = ["| test set | task | metric | " + " | ".join(stages) + " | target |",
             "|---|---|---|" + "---|" * len(stages) + "---|"]
    for subset, task, metric in _rows(results):
        vals = []
        for s in stages:
            v = results[s].get(subset, {}).get(task, {}).get(metric)
            vals.append("" if v is None
                        else (f"{v:.2f}" if metric in ("wer", "bleu") or "wer" in metric else f"{v:.4g}"))
        lines.append(f"| {subset} | {task} | {metric} | " + " | ".join(vals)
                     + f" | {targets.get((subset, task, metric), '')} |")
    if refs:
        lines += ["", "| reference: the real backbones alone | value |", "|---|---|"]
        if "whisper_wer" in refs:
            r = refs["whisper_wer"]
            lines.append(f"| Whisper tiny.en's own WER % on the test_asr clips ({r['clips']} clips) | {r['wer']:.2f} |")
            if len(r.get("by_source", {})) > 1:  # the grammar's sentences and open vocabulary (flite corpus)
                lines += [f"| ... on its {src} clips ({c['clips']}) | {c['wer']:.2f} |"
                          for src, c in r["by_source"].items()]
        if "llm_text_sqqa" in refs:
            r = refs["llm_text_sqqa"]
            lines.append(f"| SmolLM2's accuracy on the test_sqqa questions as text ({r['questions']}) "
                         f"| {r['accuracy']:.4g} |")
    if standins:
        lines += ["", "| stage-0 stand-in check | value |", "|---|---|"]
        lines += [f"| {name} | {standins[key]} |" for key, name in STANDIN_CHECKS if key in standins]
    lines.append("")
    lines.append("| step | wall time |")
    lines.append("|---|---|")
    for step, sec in times.items():
        lines.append(f"| {step} | {sec / 60:.1f} min ({sec:.0f} s) |")
    return "\n".join(lines)


def read_train_log(path: str) -> Dict[str, List[tuple]]:
    """The loss curves of a fairseq json log.

    Args:
        path (str): the log (a missing file gives empty series).

    Returns:
        Dict[str, List[tuple]]: ``train`` (train_inner loss) and ``valid`` series of (update, loss).
    """
    series: Dict[str, List[tuple]] = {"train": [], "valid": []}
    if not os.path.isfile(path):
        return series
    for line in open(path, errors="replace"):
        m = re.search(r"(\{.*\})\s*$", line)
        if not m:
            continue
        try:
            rec = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if "train_inner" in line and "loss" in rec and "num_updates" in rec:
            series["train"].append((int(rec["num_updates"]), float(rec["loss"])))
        else:  # fairseq names validation keys after the subset: valid_<subset>_num_updates, valid_<subset>_loss
            for key in rec:
                if key.startswith("valid") and key.endswith("_num_updates"):
                    loss = key[: -len("num_updates")] + "loss"
                    if loss in rec:
                        series["valid"].append((int(rec[key]), float(rec[loss])))
    return series


def plot(work: str, results) -> List[str]:
    """``loss_curves.png`` (stages 1 and 2 one after the other) and ``scores.png`` under ``work``.

    Args:
        work (str): the pipeline's folder (``stage1/train.log``, ``stage2/train.log``).
        results (Dict[str, dict]): {stage: {subset: {task: {metric: value}}}}.

    Returns:
        List[str]: the PNGs written.
    """
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # before the import: it logs at DEBUG otherwise
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for stage in ("stage1", "stage2"):
        s = read_train_log(os.path.join(work, stage, "train.log"))
        if s["train"]:
            ax.plot([u + offset for u, _ in s["train"]], [v for _, v in s["train"]], label=f"{stage} train")
        if s["valid"]:
            ax.plot([u + offset for u, _ in s["valid"]], [v for _, v in s["valid"]], "o-", label=f"{stage} valid")
        if s["train"]:
            offset += s["train"][-1][0]
    ax.set_xlabel("update (stage 2 continues after stage 1)")
    ax.set_ylabel("loss (bits per target token)")
    ax.set_title("toy WavLLM training")
    written.append(_save(plt, fig, ax, os.path.join(work, "loss_curves.png")))

    keys = [k for k in _rows(results) if k[2] in ("wer", "bleu", "accuracy", "ifr")]
    if keys:
        fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(keys)), 4))
        stages = sorted(results)
        width = 0.8 / len(stages)  # one group of bars per score, all stages side by side inside it
        for i, stage in enumerate(stages):
            vals = []
            for subset, task, metric in keys:
                v = results[stage].get(subset, {}).get(task, {}).get(metric, 0.0)
                vals.append(v / 100.0 if metric in ("wer", "bleu") else v)
            ax.bar([j + i * width for j in range(len(keys))], vals, width, label=stage)
        ax.set_xticks([j + width * (len(stages) - 1) / 2 for j in range(len(keys))])
        ax.set_xticklabels([f"{s.replace('test_', '')}\n{m}" for s, _, m in keys], fontsize=7, rotation=45, ha="right")
        ax.set_ylabel("score (WER and BLEU / 100)")
        ax.set_title("held-out toy scores")
        written.append(_save(plt, fig, ax, os.path.join(work, "scores.png")))
    return written


def _save(plt, fig, ax, path: str) -> str:
    """Legend, tight layout, PNG at 110 dpi, figure closed; returns ``path``."""
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(work: str, results, times, standins: Optional[dict] = None, refs: Optional[dict] = None,
                 recipe: str = "toy") -> str:
    """``results.json``, ``results.md`` and the plots under ``work``.

    Args:
        work (str): the pipeline's folder.
        results (Dict[str, dict]): {stage: {subset: {task: {metric: value}}}}.
        times (Dict[str, float]): step -> seconds.
        standins (Optional[dict]): stage 0's result.
        refs (Optional[dict]): the references (small_real).
        recipe (str): ``toy`` or ``small_real``.

    Returns:
        str: the tables (``format_table``).
    """
    table = format_table(results, times, standins, refs, recipe)
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "recipe": recipe, "results": results, "times_s": times,
                   "references": refs or {},
                   "stage0": {k: standins[k] for k, _ in STANDIN_CHECKS if standins and k in standins}}, f, indent=1)
    with open(os.path.join(work, "results.md"), "w") as f:
        f.write(f"WavLLM {recipe} results, {time.strftime('%Y-%m-%d')}\n\n{table}\n")
    for p in plot(work, results):
        print(f"wrote {p}")
    return table
