"""Per-task scores of decoded hypotheses against an instruction manifest (paper section 4).

    wavllm-score --manifest test_asr.tsv --hypotheses generate-test_asr.txt [--task asr] [--json out.json]

``--hypotheses`` is a ``fairseq-generate`` output (its ``D-<i>`` lines, else ``H-<i>`` lines; ``<i>`` is the
row's position among the manifest's usable rows, which is how the task numbers them) or a plain file of
``<row id>\\t<hypothesis>`` lines (the Python API's output). ``guard id=<i> reason=<r>`` lines that the
generator logs into the same output are counted per task.

Metrics, chosen by each row's task (``task`` column, else ``--task``, else the manifest's file name):

=============  ==============================================================================
asr            ``wer``: word error rate in %, on lower-cased text with punctuation removed
               (apostrophes inside words kept) and whitespace collapsed (normaliser printed)
st             ``bleu``: sacrebleu corpus BLEU (13a tokenisation) on the raw text
sv er gender   ``accuracy``: the gold label (``label`` column, else the target) is the first of the
sqqa           task's labels named in the normalised hypothesis (word match)
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
output ends with one ``<task> <metric> <value>`` line per metric.

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
import functools
import json
import logging
import os
import re
import sys
from collections import Counter, OrderedDict, defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import editdistance
import sacrebleu

from ..data.manifest import read_manifest
from ..data.text_norm import NORMALISER, normalise, words
from ..errors import WavLLMInputError

logger = logging.getLogger(__name__)

LABEL_TASKS = ("sv", "er", "gender", "sqqa", "emotion", "style")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


# ------------------------------------------------------------------------------------- metrics
def word_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Word edit distance (substitutions, deletions, insertions) between two word sequences."""
    return editdistance.eval(ref, hyp)


def word_errors(ref: str, hyp: str) -> Tuple[int, int]:
    """(word errors, reference words) on normalised texts."""
    r = words(ref)
    return word_distance(r, words(hyp)), len(r)


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    errs = [word_errors(r, h) for r, h in zip(refs, hyps)]
    return 100.0 * sum(e for e, _ in errs) / max(1, sum(n for _, n in errs))


def bleu(refs: Sequence[str], hyps: Sequence[str]) -> float:
    return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score)


def _contains_words(haystack: str, needle: str) -> int:
    """Word position of ``needle`` (normalised) in ``haystack`` (normalised), -1 when absent."""
    h, n = haystack.split(), needle.split()
    if not n:
        return -1
    for i in range(len(h) - len(n) + 1):
        if h[i: i + len(n)] == n:
            return i
    return -1


def first_label(hyp: str, labels: Iterable[str]) -> Optional[str]:
    """The label named first in the normalised hypothesis (longest label wins a tie), or None."""
    h = normalise(hyp)
    best = None
    for lab in labels:
        pos = _contains_words(h, normalise(lab))
        if pos >= 0 and (best is None or (pos, -len(lab)) < (best[0], -len(best[1]))):
            best = (pos, lab)
    return best[1] if best else None


def close_answer(ref: str, hyp: str) -> bool:
    """An ASR/ST answer close enough to count: WER <= 50% against ``ref``."""
    e, n = word_errors(ref, hyp)
    return n > 0 and e / n <= 0.5


def gold_label(row) -> str:
    """A row's gold label: its ``label`` column, else its normalised target."""
    return row.extra.get("label") or normalise(row.tgt_text)


def task_labels(task: str, rows) -> Optional[List[str]]:
    """The labels a task's accuracy picks from (label tasks; SQA when every row has a ``label``), else None."""
    if task in LABEL_TASKS or (task == "sqa" and all(r.extra.get("label") for r in rows)):
        return sorted({gold_label(r) for r in rows})
    return None


def row_right(task: str, row, hyp: str, labels: Optional[Sequence[str]]) -> bool:
    """One row as ``task``'s accuracy counts it (``labels`` from ``task_labels``): the gold label named
    first; SQA without labels: the target contained; ASR/ST: ``close_answer``; else normalised exact match."""
    if labels is not None:
        return first_label(hyp, labels) == gold_label(row)
    if task in ("asr", "st"):
        return close_answer(row.tgt_text, hyp)
    if task == "sqa":
        return _contains_words(normalise(hyp), normalise(row.tgt_text)) >= 0
    return normalise(row.tgt_text) == normalise(hyp)


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    # imported on first use: rouge-score imports nltk (about a second), and only CoT rows need it
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(ref: str, hyp: str) -> Dict[str, float]:
    """ROUGE-1/2/L F1 (0..1) by rouge-score on the raw texts, with Porter stemming (see the module docstring)."""
    scores = _rouge_scorer().score(ref, hyp)
    return {k: scores[k].fmeasure for k in ROUGE_TYPES}


def bertscore(refs: Sequence[str], hyps: Sequence[str], model_dir: str, layer: int = -1) -> float:
    """BERTScore F1 in % by the bert-score package, with the model and tokenizer in the LOCAL directory
    ``model_dir`` (``save_pretrained``; never a hub id). Greedy cosine matching of contextual token
    embeddings, no idf weighting and no baseline rescaling (its defaults), the embeddings of hidden state
    ``layer`` (-1: the last layer; k: the output of layer k, 0 the embeddings). An empty hypothesis (or
    reference) scores 0, as bert-score scores it; it is not passed to bert-score, whose 0.3.13 cannot encode
    an empty text with transformers 5."""
    if not os.path.isdir(model_dir):
        raise WavLLMInputError("not a directory: BERTScore takes a local model directory (save_pretrained), "
                               "never a hub id", file=model_dir, reason="missing")
    try:
        import bert_score  # optional and heavy (pandas, matplotlib): imported only when asked for
    except ImportError:
        raise WavLLMInputError("BERTScore needs the bert-score package: pip install wavllm_fairseq[bertscore]",
                               reason="missing") from None
    from transformers import AutoConfig, AutoTokenizer  # a few seconds to import: only BERTScore needs it here

    # bert-score loads model_type with from_pretrained: an absolute directory path is read from disk, and a
    # path starting with "scibert" (relative) would be downloaded instead; a path containing "t5" is loaded
    # as a T5 encoder whatever its model is
    path = os.path.abspath(model_dir)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if "t5" in path and "t5" not in config.model_type:
        raise WavLLMInputError(f"bert-score loads any path containing 't5' as a T5 model, and this is a "
                               f"{config.model_type}: move it to a directory without 't5' in its path",
                               file=model_dir, reason="bad_input")
    if AutoTokenizer.from_pretrained(path, local_files_only=True).model_max_length > 1_000_000:
        raise WavLLMInputError("the tokenizer states no model_max_length (bert-score truncates to it): add it "
                               "to tokenizer_config.json", file=model_dir, reason="bad_input")
    n_layers = config.num_hidden_layers
    num_layers = layer if layer >= 0 else n_layers + 1 + layer
    if not 0 <= num_layers <= n_layers:
        raise WavLLMInputError(f"layer {layer} is not a hidden state of this {n_layers}-layer model",
                               file=model_dir, reason="bad_input")
    scored = [i for i, (r, h) in enumerate(zip(refs, hyps)) if r.strip() and h.strip()]
    f1 = [0.0] * len(hyps)
    if scored:
        # transformers 5 swaps in hub kernels when loading unless told not to: nothing may be fetched
        kernels = os.environ.get("USE_HUB_KERNELS")
        os.environ["USE_HUB_KERNELS"] = "NO"
        try:
            _, _, f = bert_score.score([hyps[i] for i in scored], [refs[i] for i in scored], model_type=path,
                                       num_layers=num_layers, idf=False)
        finally:
            if kernels is None:
                del os.environ["USE_HUB_KERNELS"]
            else:
                os.environ["USE_HUB_KERNELS"] = kernels
        for i, v in zip(scored, f.tolist()):
            f1[i] = v
    return 100.0 * sum(f1) / max(1, len(f1))


def follow_multi(row, hyp: str) -> Tuple[bool, bool]:
    """(instruction followed, every sub-answer right) for a multi-task row."""
    subtasks = json.loads(row.extra.get("subtasks") or "[]") or row.task.split("+")
    targets = json.loads(row.extra.get("sub_targets") or "[]")
    markers = json.loads(row.extra.get("sub_markers") or "[]")
    h = normalise(hyp)
    if markers and len(markers) == len(subtasks):
        spans, pos = [], 0
        hw = h.split()
        for m in markers:
            at = _contains_words(" ".join(hw[pos:]), normalise(m))
            if at < 0:
                return False, False
            spans.append((pos + at, len(words(m))))
            pos = pos + at + len(words(m))
        segments = [" ".join(hw[s + n: (spans[k + 1][0] if k + 1 < len(spans) else len(hw))])
                    for k, (s, n) in enumerate(spans)]
    elif targets:
        # no markers: every sub-target must appear, in order
        segments, rest = [], h
        for t in targets:
            at = _contains_words(rest, normalise(t))
            if at < 0:
                return False, False
            rest_words = rest.split()
            segments.append(" ".join(rest_words[at: at + len(words(t))]))
            rest = " ".join(rest_words[at + len(words(t)):])
    else:
        raise WavLLMInputError(f"multi-task row {row.id} has neither sub_markers nor sub_targets columns; "
                               "the instruction-following check needs one of them")
    if not targets:
        return True, False
    ok = True
    for task, target, seg in zip(subtasks, targets, segments):
        if task in ("asr", "st"):
            ok &= close_answer(target, seg)
        else:
            ok &= _contains_words(seg, normalise(target)) >= 0
    return True, bool(ok)


# ------------------------------------------------------------------------------------- reading
_GEN_LINE = re.compile(r"^([DH])-(\d+)\t[^\t]*\t(.*)$")
_GUARD_LINE = re.compile(r"guard id=(\d+) reason=(\w+)")


def read_hypotheses(path: str, rows) -> Tuple[Dict[int, str], Dict[int, List[str]]]:
    """{row position: hypothesis} and {row position: [guard reasons]} from a generate output or an id\\ttext file."""
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
    return "multi" if "+" in task else task


# ------------------------------------------------------------------------------------- scoring
def score(rows, hyps: Dict[int, str], guards: Optional[Dict[int, List[str]]] = None,
          bertscore_model: str = "") -> "OrderedDict[str, float]":
    """``{"<task> <metric>": value}`` for rows (manifest order) and hypotheses by row position."""
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
    if labels is not None or task == "sqa":
        return {"accuracy": round(sum(row_right(task, r, h, labels) for r, h in zip(rows, hyps)) / len(rows), 4)}
    if task == "it":
        exact = sum(row_right(task, r, h, None) for r, h in zip(rows, hyps)) / len(rows)
        contained = sum(_contains_words(normalise(h), normalise(r)) >= 0 for r, h in zip(refs, hyps)) / len(rows)
        return {"accuracy": round(exact, 4), "containment": round(contained, 4)}
    # any other task: exact match and WER, both stated
    return {"exact": round(sum(normalise(r) == normalise(h) for r, h in zip(refs, hyps)) / len(rows), 4),
            "wer": round(wer(refs, hyps), 2)}


def score_files(manifest: str, hypotheses: str, task: Optional[str] = None, skip_bad_rows: bool = False,
                bertscore_model: str = "") -> "OrderedDict[str, float]":
    rows, report = read_manifest(manifest, task=task, skip_bad=skip_bad_rows, require_target=True)
    if task:
        for r in rows:
            r.task = task
    if not rows:
        raise WavLLMInputError("the manifest has no usable rows", file=manifest, reason="empty")
    hyps, guards = read_hypotheses(hypotheses, rows)
    if not hyps:
        raise WavLLMInputError("no hypotheses found (no D-/H- lines and no '<id>\\t<text>' lines)", file=hypotheses,
                               reason="empty")
    return score(rows, hyps, guards, bertscore_model)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="wavllm-score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="the instruction manifest that was decoded")
    p.add_argument("--hypotheses", required=True, help="fairseq-generate output, or '<row id>\\t<text>' lines")
    p.add_argument("--task", default=None, help="task of every row (default: the task column or the file name)")
    p.add_argument("--skip-bad-rows", action="store_true", help="the decode ran with task.skip_bad_rows")
    p.add_argument("--bertscore-model", default="", help="local model directory for BERTScore (CoT)")
    p.add_argument("--json", default="", help="also write the scores to this JSON file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        scores = score_files(args.manifest, args.hypotheses, args.task, args.skip_bad_rows, args.bertscore_model)
    except WavLLMInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"# {args.manifest}: normaliser for WER and matching: {NORMALISER}")
    for key, value in scores.items():
        print(f"{key} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(scores, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
