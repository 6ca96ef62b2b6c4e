"""Where the toy model's answers go wrong, row by row.

    python -m wavllm_fairseq.toy.breakdown --corpus manifests/toy --decode work_toy/decode/stage2 [--json out.json]

For every single-task test set and prompt pool (seen / unseen paraphrases) each row is counted once:

* ``right``: what the scorer counts right (``metrics.row_right``: the gold label named first; ASR/ST: the
  row's WER <= 50%, the threshold ``wavllm-score`` uses for multi-task sub-answers);
* ``asked task, wrong``: the answer has the asked task's form but not its content (another style, a
  garbled transcript); for labelled tasks the (gold -> said) label pairs are counted too;
* ``another task``: the answer is closer to another task's answers (``The speaker is male.`` to an ASR
  prompt), named in the last column;
* ``neither``: no test answer of any task is within half its words of it (loops, fragments).

"Closer" is the word edit distance (the scorer's, on ``text_norm`` words), divided by the longer of the
two, to the nearest target of each task's test set (multi-task combinations count as tasks of their own).
For the multi-task set, each combination's rows are counted as following the instruction or not
(``wavllm-score``'s check). ASR rows are also scored (WER) per prompt pool and sentence source: the grammar's
sentences, or open vocabulary (the flite corpus's prose; ``tables.sentence_source``).
"""
import argparse
import glob
import json
import os
import sys
from collections import Counter, defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from ..data.manifest import read_manifest
from ..data.text_norm import words
from ..evaluation.metrics import first_label, follow_multi, gold_label, row_right, task_labels, wer, word_distance
from ..evaluation.scoring import read_hypotheses
from .tables import sentence_source

NEITHER = 0.5  # nearest answer of any task further than this (edit distance / longer length): "neither"


def _distance(a: Sequence[str], b: Sequence[str]) -> float:
    """The scorer's word edit distance, divided by the longer of the two."""
    return word_distance(a, b) / max(1, len(a), len(b))


def nearest_task(hyp: str, answers: Dict[str, Iterable[Sequence[str]]]) -> Tuple[Optional[str], float]:
    """The task whose test answers come nearest to a hypothesis.

    Args:
        hyp (str): the hypothesis.
        answers (Dict[str, Iterable[Sequence[str]]]): task -> the words of each of its test answers.

    Returns:
        Tuple[Optional[str], float]: (that task, its distance); (None, inf) when there are no answers.
    """
    h = words(hyp)
    best: Tuple[Optional[str], float] = (None, float("inf"))
    for task, targets in answers.items():
        d = min(_distance(h, t) for t in targets)
        if d < best[1]:
            best = (task, d)
    return best


def _is_multi(row) -> bool:
    return row.task == "multi" or "+" in row.task


def _combination(row) -> str:
    """``asr+it``: from the ``subtasks`` column, else the row's task."""
    subtasks = json.loads(row.extra.get("subtasks") or "[]")
    return "+".join(subtasks) if subtasks else row.task


def _load(corpus: str, decode: str) -> Dict[str, Tuple[list, Dict[int, str]]]:
    sets = {}
    for path in sorted(glob.glob(os.path.join(corpus, "test_*.tsv"))):
        name = os.path.basename(path)[:-4]
        generated = os.path.join(decode, f"generate-{name}.txt")
        if not os.path.isfile(generated):
            raise SystemExit(f"{generated}: missing (decode {name} first, e.g. with the toy pipeline)")
        rows, _ = read_manifest(path)
        hyps, _ = read_hypotheses(generated, rows)
        sets[name] = (rows, hyps)
    if not sets:
        raise SystemExit(f"no test_*.tsv manifests in {corpus}")
    return sets


def wer_by_source(refs: Sequence[str], hyps: Sequence[str]) -> Dict[str, Tuple[float, int]]:
    """WER per sentence source (``tables.sentence_source`` of each reference).

    Args:
        refs (Sequence[str]): reference transcripts.
        hyps (Sequence[str]): hypotheses, one per reference.

    Returns:
        Dict[str, Tuple[float, int]]: source -> (WER %, rounded to 2 decimals; how many references), sorted.
    """
    groups: Dict[str, List[int]] = defaultdict(list)
    for i, ref in enumerate(refs):
        groups[sentence_source(ref)].append(i)
    return {src: (round(wer([refs[i] for i in idx], [hyps[i] for i in idx]), 2), len(idx))
            for src, idx in sorted(groups.items())}


def asr_by_source(sets: Dict[str, Tuple[list, Dict[int, str]]]) -> Dict[str, Dict[str, Dict[str, dict]]]:
    """WER of the ASR rows of each test set per prompt pool and sentence source (``wer_by_source``).

    Args:
        sets (Dict[str, Tuple[list, Dict[int, str]]]): test set -> (rows, hypotheses by row position).

    Returns:
        Dict[str, Dict[str, Dict[str, dict]]]: {test set: {pool: {source: {"wer": %, "rows": n}}}}, for the
        sets with ASR rows.
    """
    out: Dict[str, Dict[str, Dict[str, dict]]] = {}
    for name, (rows, hyps) in sets.items():
        pools: Dict[str, List[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            if r.task == "asr":
                pools[r.extra.get("prompt_pool", "all")].append(i)
        for pool, idx in sorted(pools.items()):
            per_source = wer_by_source([rows[i].tgt_text for i in idx], [hyps.get(i, "") for i in idx])
            out.setdefault(name, {})[pool] = {src: {"wer": w, "rows": n} for src, (w, n) in per_source.items()}
    return out


def breakdown(corpus: str, decode: str) -> dict:
    """Count where the decoded answers of every test set go (the module docstring says how).

    Args:
        corpus (str): the toy corpus folder (``test_*.tsv``).
        decode (str): the folder of ``generate-test_*.txt``.

    Returns:
        dict: ``single``: {test set: {prompt pool: counts}}; ``multi``: {combination: {pool: [followed, rows]}};
        ``asr_sources``: ``asr_by_source``.
    """
    sets = _load(corpus, decode)
    answers: Dict[str, Set[Tuple[str, ...]]] = defaultdict(set)
    for rows, _ in sets.values():
        for r in rows:
            answers[_combination(r) if _is_multi(r) else r.task].add(tuple(words(r.tgt_text)))
    single: Dict[str, Dict[str, dict]] = {}
    multi: Dict[str, Dict[str, List[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for name, (rows, hyps) in sets.items():
        for i, r in enumerate(rows):
            if _is_multi(r):
                followed, _ = follow_multi(r, hyps.get(i, ""))
                cell = multi[_combination(r)][r.extra.get("prompt_pool", "all")]
                cell[0] += int(followed)
                cell[1] += 1
        tasks = {r.task for r in rows if not _is_multi(r)}
        for task in sorted(tasks):
            task_rows = [(i, r) for i, r in enumerate(rows) if r.task == task]
            labels = task_labels(task, [r for _, r in task_rows])
            for i, r in task_rows:
                hyp = hyps.get(i, "")
                pool = r.extra.get("prompt_pool", "all")
                cell = single.setdefault(name, {}).setdefault(pool, {"rows": 0, "right": 0, "asked task, wrong": 0,
                                                                      "another task": 0, "neither": 0,
                                                                      "answered instead": Counter(),
                                                                      "wrong labels": Counter()})
                cell["rows"] += 1
                if row_right(task, r, hyp, labels):
                    cell["right"] += 1
                    continue
                other, d = nearest_task(hyp, answers)
                if other is None or d > NEITHER:
                    cell["neither"] += 1
                elif other == task:
                    cell["asked task, wrong"] += 1
                    if labels is not None:
                        cell["wrong labels"][f"{gold_label(r)} -> {first_label(hyp, labels)}"] += 1
                else:
                    cell["another task"] += 1
                    cell["answered instead"][other] += 1
    for per_pool in single.values():
        for cell in per_pool.values():
            cell["answered instead"] = dict(cell["answered instead"].most_common())
            cell["wrong labels"] = dict(cell["wrong labels"].most_common())
    return {"single": single, "multi": {k: dict(v) for k, v in sorted(multi.items())},
            "asr_sources": asr_by_source(sets)}


def format_breakdown(result: dict) -> str:
    """``breakdown``'s counts as markdown tables.

    Args:
        result (dict): what ``breakdown`` returns.

    Returns:
        str: one table of the single-task sets, one of the multi-task combinations, one of the ASR WER by
        sentence source (where a set has both sources).
    """
    out = ["| test set | prompts | rows | right | asked task, wrong | another task | neither | answered instead | "
           "wrong labels (gold -> said) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, per_pool in sorted(result["single"].items()):
        for pool, c in sorted(per_pool.items()):
            instead = ", ".join(f"{t} {n}" for t, n in c["answered instead"].items())
            labels = ", ".join(f"{t} {n}" for t, n in c["wrong labels"].items())
            out.append(f"| {name} | {pool} | {c['rows']} | {c['right']} | {c['asked task, wrong']} | "
                       f"{c['another task']} | {c['neither']} | {instead} | {labels} |")
    if result["multi"]:
        pools = sorted({p for v in result["multi"].values() for p in v})
        out += ["", "| multi-task combination | " + " | ".join(f"followed, {p} prompts" for p in pools) + " |",
                "|---|" + "---|" * len(pools)]
        for combo, per_pool in result["multi"].items():
            cells = [f"{per_pool[p][0]} of {per_pool[p][1]}" if p in per_pool else "" for p in pools]
            out.append(f"| {combo} | " + " | ".join(cells) + " |")
    mixed = {n: v for n, v in result.get("asr_sources", {}).items() if len({s for p in v.values() for s in p}) > 1}
    if mixed:
        out += ["", "| ASR test set | prompts | sentences | rows | WER |", "|---|---|---|---|---|"]
        for name, per_pool in sorted(mixed.items()):
            for pool, per_source in sorted(per_pool.items()):
                out += [f"| {name} | {pool} | {src} | {c['rows']} | {c['wer']:.2f} |" for src, c in per_source.items()]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m wavllm_fairseq.toy.breakdown`` on ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m wavllm_fairseq.toy.breakdown", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="the toy corpus folder (test_*.tsv)")
    p.add_argument("--decode", required=True, help="folder with fairseq-generate's generate-test_*.txt")
    p.add_argument("--json", help="also write the counts here")
    args = p.parse_args(argv)
    result = breakdown(args.corpus, args.decode)
    print(format_breakdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
