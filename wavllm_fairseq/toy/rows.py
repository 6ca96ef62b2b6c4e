"""The toy corpus's manifests: the rows of every task and split, drawn from its synthesized clips.

A clip is a dict (``corpus.draw_clips`` / ``corpus.draw_sv_clips``): ``id``, ``audio`` (path relative to the
corpus), ``n_frames``, ``text`` (the spoken words), ``de`` (their toy German), ``obj`` (the object named),
``style``, ``gender``, ``speaker``, ``word_samples`` (JSON word spans) and, for an SV clip, ``same`` (one
speaker or two). Every row draws its prompt from the task's seen or unseen pool with the corpus's rng, so
the order of the calls below fixes the corpus.
"""
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..data.manifest import escape_cell
from .tables import (CONNECTORS, IT_TEMPLATES_SEEN, IT_TEMPLATES_UNSEEN, IT_WORDS, MARKERS, MULTI, pool_prompts,
                     task_pool)

HEADER = ["id", "audio", "n_frames", "prompt", "tgt_text", "with_speech", "task", "speaker", "gender", "label",
          "prompt_pool", "subtasks", "sub_markers", "sub_targets", "word_samples", "transcript", "style", "n_speakers"]


def _row(**kw) -> dict:
    r = {k: "" for k in HEADER}
    r.update({k: v for k, v in kw.items() if v is not None})
    return r


def write_manifest(path: str, rows: List[dict]) -> None:
    """Write rows as a manifest with the ``HEADER`` columns (atomically: through ``path.tmp``).

    Args:
        path (str): the ``.tsv`` to write.
        rows (List[dict]): the rows, each with every ``HEADER`` key.
    """
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("\t".join(HEADER) + "\n")
        for r in rows:
            f.write("\t".join(escape_cell(str(r[c])) for c in HEADER) + "\n")
    os.replace(path + ".tmp", path)


def answer(task: str, clip: dict) -> Tuple[str, Optional[str]]:
    """The answer to a single-task question about a clip.

    Args:
        task (str): ``asr``, ``st``, ``er``, ``gender``, ``sqa`` or ``sv``.
        clip (dict): the clip.

    Returns:
        Tuple[str, Optional[str]]: (target text, label; None for ASR and ST).
    """
    if task == "asr":
        return clip["text"], None
    if task == "st":
        return clip["de"], None
    if task == "er":
        return f"The speaker sounds {clip['style']}.", clip["style"]
    if task == "gender":
        return f"The speaker is {clip['gender']}.", clip["gender"]
    if task == "sqa":
        return f"The {clip['obj']}.", clip["obj"]
    if task == "sv":
        return ("Yes, there is only one speaker." if clip["same"] else "No, there are two speakers."), (
            "yes" if clip["same"] else "no")
    if task == "sqqa":  # the spoken question's answer; the label: the words any of which makes an answer right
        return f"The answer is {clip['answer']}.", "|".join(clip["answer_words"])
    if task == "cot":  # the steps in the order the instruction asks for them
        return f"Transcription: {clip['text']}. German: {clip['de']}. Object: {clip['obj']}.", None
    raise ValueError(task)


def sub_answer(task: str, clip: Optional[dict], it_item: Optional[Tuple[str, str]]) -> str:
    """The answer to one sub-task of a multi-task row (labels alone, without a sentence around them).

    Args:
        task (str): the sub-task.
        clip (Optional[dict]): the row's clip.
        it_item (Optional[Tuple[str, str]]): (instruction, answer) of the text-only sub-task, if any.

    Returns:
        str: the sub-answer.
    """
    if task == "it":
        return it_item[1]
    if task in ("er", "gender"):
        return clip["style" if task == "er" else "gender"]
    if task == "sv":
        return "yes" if clip["same"] else "no"
    if task == "sqa":
        return clip["obj"]
    return answer(task, clip)[0]


def clip_columns(clip: dict) -> dict:
    """What a speech row records about its clip.

    Args:
        clip (dict): the clip.

    Returns:
        dict: ``word_samples``, ``transcript``, ``style`` and ``n_speakers`` (SV clips: 1 or 2).
    """
    return dict(word_samples=clip["word_samples"], transcript=clip["text"], style=clip["style"],
                n_speakers=1 if clip.get("same", True) else 2)


def single_rows(task: str, clips: List[dict], pool: str, rng: np.random.Generator) -> List[dict]:
    """One row of ``task`` per clip, each with a prompt drawn from the pool.

    Args:
        task (str): a speech task.
        clips (List[dict]): the clips.
        pool (str): ``seen`` or ``unseen`` prompts (unseen rows get an ``_unseen`` id suffix).
        rng (np.random.Generator): the corpus's generator.

    Returns:
        List[dict]: the rows.
    """
    prompts = task_pool(task, pool) if task in ("sqqa", "cot") else pool_prompts(task, pool)
    rows = []
    for c in clips:
        tgt, label = answer(task, c)
        rows.append(_row(id=f"{task}_{c['id']}" + ("_unseen" if pool == "unseen" else ""), audio=c["audio"],
                         n_frames=c["n_frames"], prompt=prompts[int(rng.integers(len(prompts)))], tgt_text=tgt,
                         with_speech="True", task=task,
                         speaker=c["speaker"], gender=c["gender"], label=label or "", prompt_pool=pool,
                         **clip_columns(c)))
    return rows


def it_items(words: Sequence[str], pool: str, n: int, rng) -> List[Tuple[str, str]]:
    """Text-only instructions about words, from the pool's templates.

    Args:
        words (Sequence[str]): the words asked about.
        pool (str): ``seen`` or ``unseen`` templates.
        n (int): how many.
        rng (np.random.Generator): the corpus's generator.

    Returns:
        List[Tuple[str, str]]: (instruction, answer) pairs.
    """
    templates = IT_TEMPLATES_SEEN if pool == "seen" else IT_TEMPLATES_UNSEEN
    out = []
    for _ in range(n):
        t, fn = templates[int(rng.integers(len(templates)))]
        w = words[int(rng.integers(len(words)))]
        out.append((t.format(w=w), fn(w)))
    return out


def multi_rows(clips: List[dict], sv_clips: List[dict], n: int, pool: str, rng, words) -> List[dict]:
    """Multi-task rows: the combinations of ``MULTI`` in turn, their instructions joined by the connectors,
    answered in order, each answer starting with its task's marker.

    Args:
        clips (List[dict]): the clips of combinations without SV.
        sv_clips (List[dict]): the two-utterance clips of combinations with SV.
        n (int): how many rows.
        pool (str): ``seen`` or ``unseen`` prompts.
        rng (np.random.Generator): the corpus's generator.
        words (Sequence[str]): the words text-only sub-tasks ask about.

    Returns:
        List[dict]: the rows (with ``subtasks``, ``sub_markers`` and ``sub_targets``).
    """
    rows = []
    for i in range(n):
        combo = MULTI[i % len(MULTI)]
        c = sv_clips[int(rng.integers(len(sv_clips)))] if "sv" in combo else clips[int(rng.integers(len(clips)))]
        it = it_items(words, pool, 1, rng)[0] if "it" in combo else None
        conns = CONNECTORS[len(combo)]
        prompts, answers, subs = [], [], []
        for k, t in enumerate(combo):
            p = it[0] if t == "it" else pool_prompts(t, pool)[int(rng.integers(5 if pool == "unseen" else 10))]
            prompts.append(f"{conns[k]} {p[0].lower()}{p[1:]}")
            sub = sub_answer(t, c, it)
            subs.append(sub)
            answers.append(f"{MARKERS[t]} {sub}")
        rows.append(_row(id=f"multi_{pool}{i}_{c['id']}", audio=c["audio"], n_frames=c["n_frames"],
                         prompt=" ".join(prompts), tgt_text=" ".join(answers), with_speech="True",
                         task="+".join(combo), speaker=c["speaker"],
                         gender=c["gender"], prompt_pool=pool, subtasks=json.dumps(list(combo)), **clip_columns(c),
                         sub_markers=json.dumps([MARKERS[t] for t in combo]), sub_targets=json.dumps(subs)))
    return rows


def it_rows(words, pool, n, rng, prefix) -> List[dict]:
    """Text-only rows (no audio) of ``it_items``.

    Args:
        words (Sequence[str]): the words asked about.
        pool (str): ``seen`` or ``unseen`` templates.
        n (int): how many rows.
        rng (np.random.Generator): the corpus's generator.
        prefix (str): the rows' ids are ``<prefix><i>``.

    Returns:
        List[dict]: the rows.
    """
    return [_row(id=f"{prefix}{i}", audio="", n_frames=0, prompt=q, tgt_text=a, with_speech="False", task="it",
                 prompt_pool=pool) for i, (q, a) in enumerate(it_items(words, pool, n, rng))]


def task_manifests(clips: Dict[str, List[dict]], sizes: dict, rng: np.random.Generator) -> Dict[str, List[dict]]:
    """Every manifest of the corpus. Training: ASR on every train clip, the other tasks on shares of them;
    validation: seen prompts; test: every clip twice, with a seen and with an unseen prompt (column
    ``prompt_pool``), so one decode per task gives the seen vs unseen comparison on the same audio.

    Args:
        clips (Dict[str, List[dict]]): the clips of ``train``, ``test``, ``valid``, ``sv_train``, ``sv_test``,
            ``sv_valid``.
        sizes (dict): the corpus size's ``it_train``, ``multi_train`` and ``multi_test`` counts.
        rng (np.random.Generator): the corpus's generator.

    Returns:
        Dict[str, List[dict]]: manifest name (``train_asr`` ...) -> rows, in the order they are drawn.
    """
    train, test, valid = clips["train"], clips["test"], clips["valid"]
    sv_train, sv_test, sv_valid = clips["sv_train"], clips["sv_test"], clips["sv_valid"]
    manifests: Dict[str, List[dict]] = {}
    words = IT_WORDS
    manifests["train_asr"] = single_rows("asr", train, "seen", rng)
    manifests["train_st"] = single_rows("st", train[: len(train) * 2 // 3], "seen", rng)
    manifests["train_er"] = single_rows("er", train[len(train) // 3:], "seen", rng)
    manifests["train_gender"] = single_rows("gender", train[: len(train) // 2], "seen", rng)
    manifests["train_sqa"] = single_rows("sqa", train[len(train) // 2:], "seen", rng)
    manifests["train_sv"] = single_rows("sv", sv_train, "seen", rng)
    manifests["train_it"] = it_rows(words, "seen", sizes["it_train"], rng, "it_train")
    manifests["train_multi"] = multi_rows(train, sv_train, sizes["multi_train"], "seen", rng, words)
    for task in ("asr", "st", "er", "gender", "sqa"):
        manifests[f"valid_{task}"] = single_rows(task, valid, "seen", rng)
        manifests[f"test_{task}"] = single_rows(task, test, "seen", rng) + single_rows(task, test, "unseen", rng)
    manifests["valid_sv"] = single_rows("sv", sv_valid, "seen", rng)
    manifests["test_sv"] = single_rows("sv", sv_test, "seen", rng) + single_rows("sv", sv_test, "unseen", rng)
    manifests["valid_it"] = it_rows(words, "seen", len(valid), rng, "it_valid")
    manifests["test_it"] = (it_rows(words, "seen", len(test), rng, "it_test")
                            + it_rows(words, "unseen", len(test), rng, "it_test_unseen"))
    manifests["valid_multi"] = multi_rows(valid, sv_valid, len(valid), "seen", rng, words)
    manifests["test_multi"] = (multi_rows(test, sv_test, sizes["multi_test"], "seen", rng, words)
                               + multi_rows(test, sv_test, sizes["multi_test"], "unseen", rng, words))
    return manifests


def real_task_manifests(clips: Dict[str, List[dict]], sizes: dict, rng: np.random.Generator) -> Dict[str, List[dict]]:
    """The flite corpus's manifests: ``task_manifests``, then SQQA (spoken questions) and CoT (one instruction
    asking for transcription, German and the object, in that order) for training, validation and test, then
    the open-vocabulary ASR rows: the prose clips of each split and, in training, the spoken questions
    (appended to ``<split>_asr``, after the grammar's rows).

    Args:
        clips (Dict[str, List[dict]]): ``task_manifests``'s clips and ``sqqa_train``, ``sqqa_valid``, ``sqqa_test``,
            ``prose_train``, ``prose_valid``, ``prose_test``.
        sizes (dict): ``task_manifests``'s counts and ``cot_train``.
        rng (np.random.Generator): the corpus's generator.

    Returns:
        Dict[str, List[dict]]: manifest name -> rows.
    """
    manifests = task_manifests(clips, sizes, rng)
    train, test, valid = clips["train"], clips["test"], clips["valid"]
    manifests["train_sqqa"] = single_rows("sqqa", clips["sqqa_train"], "seen", rng)
    manifests["valid_sqqa"] = single_rows("sqqa", clips["sqqa_valid"], "seen", rng)
    manifests["test_sqqa"] = (single_rows("sqqa", clips["sqqa_test"], "seen", rng)
                              + single_rows("sqqa", clips["sqqa_test"], "unseen", rng))
    manifests["train_cot"] = single_rows("cot", train[-sizes["cot_train"]:], "seen", rng)
    manifests["valid_cot"] = single_rows("cot", valid, "seen", rng)
    manifests["test_cot"] = single_rows("cot", test, "seen", rng) + single_rows("cot", test, "unseen", rng)
    manifests["train_asr"] += single_rows("asr", clips["prose_train"] + clips["sqqa_train"], "seen", rng)
    manifests["valid_asr"] += single_rows("asr", clips["prose_valid"], "seen", rng)
    manifests["test_asr"] += (single_rows("asr", clips["prose_test"], "seen", rng)
                              + single_rows("asr", clips["prose_test"], "unseen", rng))
    return manifests
