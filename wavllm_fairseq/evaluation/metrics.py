"""The per-row and per-set measures ``wavllm-score`` reports (``scoring`` says which task gets which):
word errors and WER, BLEU, label and containment matching, the multi-task instruction-following check,
ROUGE and BERTScore. Texts are compared after ``text_norm.normalise`` except by BLEU, ROUGE and BERTScore,
which tokenise the raw texts themselves, and by the two WERs kept for comparison with numbers reported
elsewhere (:func:`comparable_wers`): under Whisper's English normaliser and as fairseq's ``wer`` scorer counts.
"""
import functools
import json
import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import editdistance
import sacrebleu
from fairseq.scoring.wer import WerScorer, WerScorerConfig
from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

from ..data.text_norm import normalise, words
from ..errors import WavLLMInputError

LABEL_TASKS = ("sv", "er", "gender", "emotion", "style")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def word_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Word edit distance (substitutions, deletions, insertions) between two word sequences.

    Args:
        ref (Sequence[str]): reference words.
        hyp (Sequence[str]): hypothesis words.

    Returns:
        int: the edit distance.
    """
    return editdistance.eval(ref, hyp)


def word_errors(ref: str, hyp: str) -> Tuple[int, int]:
    """Word errors of a hypothesis on normalised texts.

    Args:
        ref (str): the reference text.
        hyp (str): the hypothesis text.

    Returns:
        Tuple[int, int]: (word errors, reference words).
    """
    r = words(ref)
    return word_distance(r, words(hyp)), len(r)


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus word error rate: the errors of every row over the reference words of every row.

    Args:
        refs (Sequence[str]): reference texts.
        hyps (Sequence[str]): hypothesis texts, one per reference.

    Returns:
        float: WER in %.
    """
    errs = [word_errors(r, h) for r, h in zip(refs, hyps)]
    return 100.0 * sum(e for e, _ in errs) / max(1, sum(n for _, n in errs))


WHISPER_SPELLING_FILE = "normalizer.json"  # the spelling map's name in a Hugging Face Whisper tokenizer folder
FAIRSEQ_WER = ("fairseq's wer scorer as fairseq-generate --scoring wer runs it by default (no tokenizer, case and "
               "punctuation kept), on the manifest's tgt_text")


def whisper_normaliser(spelling: str = "") -> Tuple[Callable[[str], str], str]:
    """Whisper's English normaliser (transformers' ``EnglishTextNormalizer``, which the Open ASR Leaderboard
    scores under) and what it was built from.

    The normaliser's British -> American spelling map ships with Whisper's tokenizer (``normalizer.json`` in a
    Hugging Face Whisper folder), not with transformers; without it those words are left as they are.

    Args:
        spelling (str): the spelling map: a ``normalizer.json`` file or a folder holding one; "" for none.

    Returns:
        Tuple[Callable[[str], str], str]: the normaliser and a description naming its spelling map or its absence.

    Raises:
        WavLLMInputError: for a spelling map that cannot be read.
    """
    if not spelling:
        return EnglishTextNormalizer({}), ("Whisper's EnglishTextNormalizer (transformers) WITHOUT its spelling map "
                                           "(British spellings kept; pass --whisper-spelling <Whisper folder with "
                                           f"{WHISPER_SPELLING_FILE}>)")
    path = os.path.join(spelling, WHISPER_SPELLING_FILE) if os.path.isdir(spelling) else spelling
    try:
        with open(path, encoding="utf-8") as f:
            mapping = json.load(f)
    except (OSError, ValueError) as e:
        raise WavLLMInputError(f"cannot read Whisper's spelling map ({e}); give the {WHISPER_SPELLING_FILE} of a "
                               "Whisper tokenizer folder, or the folder", file=path, reason="missing") from None
    if not isinstance(mapping, dict):
        raise WavLLMInputError("Whisper's spelling map must be a JSON object (british -> american)", file=path,
                               reason="bad_input")
    return EnglishTextNormalizer(mapping), f"Whisper's EnglishTextNormalizer (transformers), spelling map {path}"


def comparable_wers(refs: Sequence[str], hyps: Sequence[str], whisper: Callable[[str], str]) -> Dict[str, float]:
    """WER as other reports count it: under Whisper's English normaliser, and by fairseq's ``wer`` scorer.

    Args:
        refs (Sequence[str]): reference texts.
        hyps (Sequence[str]): hypothesis texts.
        whisper (Callable[[str], str]): the normaliser of :func:`whisper_normaliser`.

    Returns:
        Dict[str, float]: ``wer_whisper`` (WER in % of the normalised texts, split on whitespace) and
        ``wer_fairseq`` (``fairseq.scoring.wer.WerScorer`` with its default config, in %).
    """
    ref_words, hyp_words = [whisper(r).split() for r in refs], [whisper(h).split() for h in hyps]
    errors = sum(word_distance(r, h) for r, h in zip(ref_words, hyp_words))
    scorer = WerScorer(WerScorerConfig())
    for r, h in zip(refs, hyps):
        scorer.add_string(r, h)
    return {"wer_whisper": 100.0 * errors / max(1, sum(len(r) for r in ref_words)),
            "wer_fairseq": float(scorer.score())}


def bleu(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (13a tokenisation) on the raw texts.

    Args:
        refs (Sequence[str]): reference texts (one reference per row).
        hyps (Sequence[str]): hypothesis texts.

    Returns:
        float: BLEU (0-100).
    """
    return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score)


def find_words(haystack: str, needle: str) -> int:
    """Where a word sequence occurs in another.

    Args:
        haystack (str): normalised text searched in.
        needle (str): normalised text searched for.

    Returns:
        int: word position of ``needle`` in ``haystack``, -1 when absent (or ``needle`` is empty).
    """
    h, n = haystack.split(), needle.split()
    if not n:
        return -1
    for i in range(len(h) - len(n) + 1):
        if h[i: i + len(n)] == n:
            return i
    return -1


def first_label(hyp: str, labels: Iterable[str]) -> Optional[str]:
    """The label named first in the normalised hypothesis (longest label wins a tie).

    Args:
        hyp (str): the hypothesis.
        labels (Iterable[str]): the labels to look for.

    Returns:
        Optional[str]: the label, or None when none is named.
    """
    h = normalise(hyp)
    best = None
    for lab in labels:
        pos = find_words(h, normalise(lab))
        if pos >= 0 and (best is None or (pos, -len(lab)) < (best[0], -len(best[1]))):
            best = (pos, lab)
    return best[1] if best else None


def close_answer(ref: str, hyp: str) -> bool:
    """Whether an ASR/ST answer is close enough to count.

    Args:
        ref (str): the reference.
        hyp (str): the answer.

    Returns:
        bool: True when its WER against ``ref`` is at most 50%.
    """
    e, n = word_errors(ref, hyp)
    return n > 0 and e / n <= 0.5


def gold_label(row) -> str:
    """A row's gold label.

    Args:
        row (ManifestRow): a manifest row.

    Returns:
        str: its ``label`` column, else its normalised target.
    """
    return row.extra.get("label") or normalise(row.tgt_text)


def task_labels(task: str, rows) -> Optional[List[str]]:
    """The labels a task's accuracy picks from.

    Args:
        task (str): the task.
        rows (Sequence[ManifestRow]): the task's rows.

    Returns:
        Optional[List[str]]: the sorted gold labels for label tasks (and SQA when every row has a ``label``),
        else None.
    """
    if task in LABEL_TASKS or (task == "sqa" and all(r.extra.get("label") for r in rows)):
        return sorted({gold_label(r) for r in rows})
    return None


def row_right(task: str, row, hyp: str, labels: Optional[Sequence[str]]) -> bool:
    """One row as ``task``'s accuracy counts it: SQQA: the gold answer (``label``: its variants joined by
    ``|``, else the target) named; the gold label named first; SQA without labels: the target contained;
    ASR/ST: ``close_answer``; else normalised exact match.

    Args:
        task (str): the row's task.
        row (ManifestRow): the row.
        hyp (str): its hypothesis.
        labels (Optional[Sequence[str]]): ``task_labels`` of the task's rows.

    Returns:
        bool: whether the answer is right.
    """
    if task == "sqqa":  # an open answer: right when it names the gold answer (or one of its ``|`` variants)
        golds = [a for a in (row.extra.get("label") or row.tgt_text).split("|") if a.strip()]
        return any(find_words(normalise(hyp), normalise(a)) >= 0 for a in golds)
    if labels is not None:
        return first_label(hyp, labels) == gold_label(row)
    if task in ("asr", "st"):
        return close_answer(row.tgt_text, hyp)
    if task == "sqa":
        return find_words(normalise(hyp), normalise(row.tgt_text)) >= 0
    return normalise(row.tgt_text) == normalise(hyp)


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    # imported on first use: rouge-score imports nltk, which is slow to import, and only CoT rows need it
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(ref: str, hyp: str) -> Dict[str, float]:
    """ROUGE-1/2/L F1 by rouge-score on the raw texts, with Porter stemming (``scoring``'s docstring says more).

    Args:
        ref (str): the reference.
        hyp (str): the hypothesis.

    Returns:
        Dict[str, float]: F1 (0..1) for each of ``ROUGE_TYPES``.
    """
    scores = _rouge_scorer().score(ref, hyp)
    return {k: scores[k].fmeasure for k in ROUGE_TYPES}


def bertscore(refs: Sequence[str], hyps: Sequence[str], model_dir: str, layer: int = -1) -> float:
    """BERTScore F1 by the bert-score package, with the model and tokenizer in a LOCAL directory
    (``save_pretrained``; never a hub id). Greedy cosine matching of contextual token embeddings, no idf
    weighting and no baseline rescaling (its defaults). An empty hypothesis (or reference) scores 0, as
    bert-score scores it; it is not passed to bert-score, whose 0.3.13 cannot encode an empty text with
    transformers 5.

    Args:
        refs (Sequence[str]): reference texts.
        hyps (Sequence[str]): hypothesis texts.
        model_dir (str): the model directory.
        layer (int): the hidden state whose embeddings are matched (-1: the last layer; k: the output of
            layer k, 0 the embeddings).

    Returns:
        float: the mean F1 over the rows, in %.
    """
    if not os.path.isdir(model_dir):
        raise WavLLMInputError("not a directory: BERTScore takes a local model directory (save_pretrained), "
                               "never a hub id", file=model_dir, reason="missing")
    try:
        import bert_score  # optional and heavy (pandas, matplotlib): imported only when asked for
    except ImportError:
        raise WavLLMInputError("BERTScore needs the bert-score package: pip install wavllm_fairseq[bertscore]",
                               reason="missing") from None
    from transformers import AutoConfig, AutoTokenizer  # slow to import: only BERTScore needs it here

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
    """The multi-task check of one row: every sub-task answered in order (the row's ``sub_markers`` found
    in order, else every ``sub_targets`` entry found in order), and every sub-answer right (ASR/ST:
    ``close_answer``, others: contained).

    Args:
        row (ManifestRow): a multi-task row (``subtasks``, ``sub_markers`` and/or ``sub_targets`` columns).
        hyp (str): its hypothesis.

    Returns:
        Tuple[bool, bool]: (instruction followed, every sub-answer right).
    """
    subtasks = json.loads(row.extra.get("subtasks") or "[]") or row.task.split("+")
    targets = json.loads(row.extra.get("sub_targets") or "[]")
    markers = json.loads(row.extra.get("sub_markers") or "[]")
    h = normalise(hyp)
    if markers and len(markers) == len(subtasks):
        spans, pos = [], 0
        hw = h.split()
        for m in markers:
            at = find_words(" ".join(hw[pos:]), normalise(m))
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
            at = find_words(rest, normalise(t))
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
            ok &= find_words(seg, normalise(target)) >= 0
    return True, bool(ok)
