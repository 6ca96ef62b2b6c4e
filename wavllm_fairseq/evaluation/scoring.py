"""Per-task scores of decoded hypotheses against an instruction manifest (paper section 4).

    wavllm-score --manifest test_asr.tsv --hypotheses generate-test_asr.txt [--task asr] [--json out.json]

``--hypotheses`` is a ``fairseq-generate`` output (its ``D-<i>`` lines, else ``H-<i>`` lines; ``<i>`` is the
row's position among the manifest's usable rows, which is how the task numbers them) or a plain file of
``<row id>\\t<hypothesis>`` lines (the Python API's output). ``guard id=<i> reason=<r>`` lines that the
generator logs into the same output are counted per task.

Metrics, chosen by each row's task (``task`` column, else ``--task``, else the manifest's file name):

=============  ==============================================================================
asr            ``wer``: word error rate in %, on lower-cased text with punctuation removed
               (apostrophes inside words kept) and whitespace collapsed (normaliser printed);
               beside it, on all the task's rows, ``wer_whisper`` (under Whisper's English normaliser)
               and ``wer_fairseq`` (as ``fairseq-generate --scoring wer`` counts): see below
st             ``bleu``: sacrebleu corpus BLEU (13a tokenisation) on the raw text
sv er gender   ``accuracy``: the gold label (``label`` column, else the target) is the first of the
               task's labels named in the normalised hypothesis (word match)
sqqa           ``accuracy``: the gold answer is named (``label``: its variants joined by ``|``, else the target)
sqa            ``accuracy``: the ``label`` is named (first of the labels), else the normalised target is
               contained in the normalised hypothesis
it             ``accuracy``: normalised exact match (``containment`` also printed)
cot            ``rouge1 rouge2 rougeL`` F1 in % (rouge-score, stemmed: below); ``bertscore`` F1
               (bert-score) only with ``--bertscore-model DIR``
multi (a+b..)  ``ifr``: instruction-following rate, every sub-task answered in order (the row's
               ``sub_markers`` found in order, else every sub-target found in order); ``accuracy``:
               followed and every sub-answer right (ASR/ST sub-answers: WER <= 50%, others: contained)
=============  ==============================================================================

Rows carrying a ``prompt_pool`` column also get ``<metric>_<pool>`` lines (seen vs unseen prompts). The
output's first line names the normalisers; it ends with one ``<task> <metric> <value>`` line per metric.
A manifest in another format (a reference test set, a wav2vec/HuBERT manifest, a speech_to_text TSV) is read
as the task reads it (``--format``, default told by its first line; ``--prompt-pool`` as the decode's, whose
shipped pool names give wav2vec / S2T rows their task); the reference's file names give the
task (``en2de`` -> st, ``emo`` -> er, ...: ``manifest.REFERENCE_TASKS``).

Three WERs, for three comparisons. ``wer`` normalises as described below (this project's tables).
``wer_whisper`` normalises both texts with Whisper's ``EnglishTextNormalizer`` (transformers), as the Open
ASR Leaderboard does: numbers spelled out become digits, contractions and British spellings are unified
(the spelling map ships with a Whisper tokenizer, ``normalizer.json``: ``--whisper-spelling``; the first
line says when it is absent). ``wer_fairseq`` is fairseq's own ``wer`` scorer with its default config, the
number ``fairseq-generate --scoring wer`` prints (and the reference implementation's scripts report), on
the manifest's ``tgt_text`` where fairseq uses the ``T-`` line (the same text unless the tokenizer cannot
encode some character of it).

Text normalisation. WER, label and containment matching, IT exact match and the multi-task checks compare
texts after ``text_norm.normalise`` (named on the output's first line): lower-cased; ASCII punctuation and
the Unicode quotes, dashes, inverted question and exclamation marks turned into spaces; an apostrophe kept
inside a word (``don't``, ``90's``) and dropped as a quote (``'quoted'``); whitespace collapsed. Words of any
alphabet stay whole. It is the normaliser the instruction augmenter splits training prompts with: both
read ``text_norm``, so that a change to this scorer cannot change training. BLEU, ROUGE and BERTScore
tokenise the raw texts themselves (below), as their papers do.

ROUGE is Google's ``rouge-score`` package (the implementation chain-of-thought papers report), F1 of
``rouge1``, ``rouge2`` and ``rougeL`` (sentence-level longest common subsequence, not ``rougeLsum``),
with Porter stemming (``use_stemmer=True``) and its own tokeniser: lower-case, every character outside
``a-z0-9`` a separator (so it is for English: other letters split words or vanish). BERTScore is the
``bert-score`` package (optional, ``pip install wavllm_fairseq[bertscore]``) on a LOCAL model directory.

Why ``fairseq-generate --scoring wer`` reports another WER. fairseq's ``wer`` scorer
(fairseq/scoring/wer.py) passes each reference and hypothesis through its ``EvaluationTokenizer``: a
sacrebleu tokeniser (``--wer-tokenizer``, default ``none``: the text as it is), then, each off by
default, dropping the tokens made only of Unicode punctuation (``--wer-remove-punct``; ``sat.`` keeps its
period unless the tokeniser split it off), splitting into characters (``--wer-char-level``) and
lower-casing (``--wer-lowercase``); it then splits on spaces and divides the edit distance summed over
rows by the reference words. With its defaults ``The cat sat.`` against ``the cat sat`` is 2 errors in 3
words there and none here. Even with ``--wer-tokenizer 13a --wer-remove-punct --wer-lowercase`` quotes
and hyphens stay on words there (``'quoted'``, ``c-a-t``, ``3.5`` are one word each) and not here. Its
reference is the ``T-`` line (the target tokens decoded again), here the manifest's ``tgt_text``; and it
scores the whole subset as one set, here rows are split by task and prompt pool.
"""
import argparse
import json
import logging
import re
import sys
from collections import Counter, OrderedDict, defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..data.manifest import FORMATS, read_manifest
from ..data.text_norm import NORMALISER, normalise
from ..errors import WavLLMInputError
from .metrics import (FAIRSEQ_WER, ROUGE_TYPES, WHISPER_SPELLING_FILE, bertscore, bleu, comparable_wers, find_words,
                      follow_multi, rouge, row_right, task_labels, wer, whisper_normaliser)

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- reading
_GEN_LINE = re.compile(r"^([DH])-(\d+)\t[^\t]*\t(.*)$")
_GUARD_LINE = re.compile(r"guard id=(\d+) reason=(\w+)")


def read_hypotheses(path: str, rows) -> Tuple[Dict[int, str], Dict[int, List[str]]]:
    """The hypotheses of a ``fairseq-generate`` output (D-, else H- lines) or of ``<row id>\\t<text>`` lines,
    and the generator's guard lines.

    Args:
        path (str): the hypotheses file.
        rows (Sequence[ManifestRow]): the manifest's usable rows, in order.

    Returns:
        Tuple[Dict[int, str], Dict[int, List[str]]]: {row position: hypothesis}, {row position: [guard reasons]}.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise WavLLMInputError(f"cannot read the hypotheses ({e.strerror})", file=path, reason="missing") from None
    d_lines, h_lines, guards = {}, {}, defaultdict(list)
    for line in lines:
        m = _GEN_LINE.match(line)
        if m:
            (d_lines if m.group(1) == "D" else h_lines)[int(m.group(2))] = m.group(3)
            continue
        g = _GUARD_LINE.search(line)
        if g:
            guards[int(g.group(1))].append(g.group(2))
    hyps = d_lines or h_lines
    if not hyps:
        by_id = {r.id: i for i, r in enumerate(rows)}
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            rid, _, text = line.partition("\t")
            if rid not in by_id:
                raise WavLLMInputError(f"line {n}: id {rid!r} is not in the manifest (expected fairseq-generate "
                                       "D-/H- lines or '<row id>\\t<hypothesis>')", file=path, reason="mismatch")
            hyps[by_id[rid]] = text
    unknown = [i for i in hyps if i >= len(rows)]
    if unknown:
        raise WavLLMInputError(f"hypothesis numbers {unknown[:5]} exceed the manifest's {len(rows)} usable rows: "
                               "was it decoded from another manifest?", file=path, reason="mismatch")
    return hyps, dict(guards)


def task_group(task: str) -> str:
    """The task a row is scored under.

    Args:
        task (str): the row's task (``asr``, ``asr+st`` ...).

    Returns:
        str: ``multi`` for a combination of tasks, else ``task``.
    """
    return "multi" if "+" in task else task


# ------------------------------------------------------------------------------------- scoring
def score(rows, hyps: Dict[int, str], guards: Optional[Dict[int, List[str]]] = None,
          bertscore_model: str = "", whisper: Optional[Callable[[str], str]] = None) -> "OrderedDict[str, float]":
    """Every metric of every task of the rows, on all rows and per prompt pool.

    Args:
        rows (Sequence[ManifestRow]): the rows, in manifest order.
        hyps (Dict[int, str]): hypotheses by row position.
        guards (Optional[Dict[int, List[str]]]): guard reasons by row position, counted per task.
        bertscore_model (str): a local model directory for CoT BERTScore, or "" (none).
        whisper (Optional[Callable[[str], str]]): Whisper's English normaliser for ASR's ``wer_whisper``
            (default: ``metrics.whisper_normaliser()``'s, without a spelling map).

    Returns:
        OrderedDict[str, float]: ``{"<task> <metric>[_<pool>]": value}``, with ``<task> n`` and, where there
        are any, ``<task> missing`` and ``<task> guard_<reason>`` counts.
    """
    groups: Dict[str, List[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        groups[task_group(r.task)].append(i)
    out: "OrderedDict[str, float]" = OrderedDict()
    for task, idx in groups.items():
        pools = sorted({rows[i].extra.get("prompt_pool", "") for i in idx} - {""})
        for pool in [""] + pools:
            sel = [i for i in idx if not pool or rows[i].extra.get("prompt_pool", "") == pool]
            suffix = f"_{pool}" if pool else ""
            for metric, value in _task_metrics(task, [rows[i] for i in sel], [hyps.get(i, "") for i in sel],
                                               bertscore_model).items():
                out[f"{task} {metric}{suffix}"] = value
        if task == "asr":
            norm = whisper or whisper_normaliser()[0]
            for metric, value in comparable_wers([rows[i].tgt_text for i in idx], [hyps.get(i, "") for i in idx],
                                                 norm).items():
                out[f"{task} {metric}"] = round(value, 2)
        out[f"{task} n"] = len(idx)
        missing = sum(1 for i in idx if i not in hyps)
        if missing:
            out[f"{task} missing"] = missing
        reasons = Counter(r for i in idx for r in (guards or {}).get(i, []))
        for reason, n in sorted(reasons.items()):
            out[f"{task} guard_{reason}"] = n
    return out


def _task_metrics(task: str, rows, hyps: List[str], bertscore_model: str) -> Dict[str, float]:
    refs = [r.tgt_text for r in rows]
    if task == "asr":
        return {"wer": round(wer(refs, hyps), 2)}
    if task == "st":
        return {"bleu": round(bleu(refs, hyps), 2)}
    if task == "multi":
        res = [follow_multi(r, h) for r, h in zip(rows, hyps)]
        return {"ifr": round(sum(f for f, _ in res) / len(res), 4),
                "accuracy": round(sum(a for _, a in res) / len(res), 4)}
    if task == "cot":
        rs = [rouge(r, h) for r, h in zip(refs, hyps)]
        m = {k: round(100 * sum(x[k] for x in rs) / len(rs), 2) for k in ROUGE_TYPES}
        if bertscore_model:
            m["bertscore"] = round(bertscore(refs, hyps, bertscore_model), 2)
        return m
    labels = task_labels(task, rows)
    if labels is not None or task in ("sqa", "sqqa"):
        return {"accuracy": round(sum(row_right(task, r, h, labels) for r, h in zip(rows, hyps)) / len(rows), 4)}
    if task == "it":
        exact = sum(row_right(task, r, h, None) for r, h in zip(rows, hyps)) / len(rows)
        contained = sum(find_words(normalise(h), normalise(r)) >= 0 for r, h in zip(refs, hyps)) / len(rows)
        return {"accuracy": round(exact, 4), "containment": round(contained, 4)}
    # any other task: exact match and WER, both stated
    return {"exact": round(sum(normalise(r) == normalise(h) for r, h in zip(refs, hyps)) / len(rows), 4),
            "wer": round(wer(refs, hyps), 2)}


def score_files(manifest: str, hypotheses: str, task: Optional[str] = None, skip_bad_rows: bool = False,
                bertscore_model: str = "", fmt: str = "auto", whisper: Optional[Callable[[str], str]] = None,
                prompt_pool: str = "") -> "OrderedDict[str, float]":
    """``score`` of a hypotheses file against a manifest.

    Args:
        manifest (str): the manifest that was decoded.
        hypotheses (str): its ``fairseq-generate`` output or ``<row id>\\t<text>`` lines.
        task (Optional[str]): the task of every row (default: the ``task`` column, else the file name).
        skip_bad_rows (bool): skip bad rows as the decode did (``task.skip_bad_rows``).
        bertscore_model (str): a local model directory for CoT BERTScore, or "".
        fmt (str): the manifest's format (``task.manifest_format``; ``auto``: told by its first line).
        whisper (Optional[Callable[[str], str]]): Whisper's English normaliser (see ``score``).
        prompt_pool (str): the decode's ``task.prompt_pool`` for a wav2vec / S2T manifest (a shipped pool's name
            gives its rows' task).

    Returns:
        OrderedDict[str, float]: as ``score`` returns it.
    """
    rows, report = read_manifest(manifest, task=task, skip_bad=skip_bad_rows, require_target=True, fmt=fmt,
                                 prompt_pool=prompt_pool)
    if task:
        for r in rows:
            r.task = task
    if not rows:
        raise WavLLMInputError("the manifest has no usable rows", file=manifest, reason="empty")
    hyps, guards = read_hypotheses(hypotheses, rows)
    if not hyps:
        raise WavLLMInputError("no hypotheses found (no D-/H- lines and no '<id>\\t<text>' lines)", file=hypotheses,
                               reason="empty")
    return score(rows, hyps, guards, bertscore_model, whisper)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``wavllm-score`` on ``argv`` (default: ``sys.argv[1:]``); returns the exit status (1 on an input error)."""
    p = argparse.ArgumentParser(prog="wavllm-score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="the instruction manifest that was decoded")
    p.add_argument("--hypotheses", required=True, help="fairseq-generate output, or '<row id>\\t<text>' lines")
    p.add_argument("--task", default=None, help="task of every row (default: the task column or the file name)")
    p.add_argument("--skip-bad-rows", action="store_true", help="the decode ran with task.skip_bad_rows")
    p.add_argument("--bertscore-model", default="", help="local model directory for BERTScore (CoT)")
    p.add_argument("--json", default="", help="also write the scores to this JSON file")
    p.add_argument("--format", default="auto", choices=FORMATS,
                   help="how the manifest is read (task.manifest_format; default: told by its first line)")
    p.add_argument("--whisper-spelling", default="",
                   help=f"Whisper's spelling map for wer_whisper: its {WHISPER_SPELLING_FILE} or a Whisper tokenizer "
                        "folder holding one (default: none, which the first output line says)")
    p.add_argument("--prompt-pool", default="",
                   help="the decode's task.prompt_pool, for wav2vec/speech_to_text manifests (st.seen: ST rows)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        whisper, whisper_doc = whisper_normaliser(args.whisper_spelling)
        scores = score_files(args.manifest, args.hypotheses, args.task, args.skip_bad_rows, args.bertscore_model,
                             args.format, whisper, args.prompt_pool)
    except WavLLMInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    comparable = (f"; wer_whisper: {whisper_doc}; wer_fairseq: {FAIRSEQ_WER}"
                  if any(k.startswith("asr wer_whisper") for k in scores) else "")
    print(f"# {args.manifest}: normaliser for WER and matching: {NORMALISER}{comparable}")
    for key, value in scores.items():
        print(f"{key} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(scores, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
