"""The clips of the flite corpus (``wavllm-make-toy-corpus --voices flite``), the real small recipe's corpus.

The same grammar, translations and tasks as the espeak-ng toy corpus (corpus.py, rows.py), spoken by flite
speakers (flite.py) that the real Whisper tiny.en hears, plus spoken questions (SQQA: the question is the
audio, ``data/sqqa.json``; a seeded share of the questions is held out for the test set), CoT rows and
plain English sentences outside the grammar (``data/prose.json``, ASR only: without them every transcript the
adapters learn from is a grammar sentence, and a spoken question reaches the LLM as one; a seeded share is
held out). Test and validation clips use the held-out speakers and sentences.
"""
from typing import Dict, List, Sequence

import numpy as np

from . import flite, tables
from .tables import PROSE, STYLES, SQQA_QUESTIONS, translate

TEST_QUESTION_PERCENT = 30  # a seeded share of the spoken questions, held out for valid and test
TEST_PROSE_PERCENT = 15  # a seeded share of the prose sentences, held out for valid and test


def _clip(split: str, i: int, prefix: str, text: str, spk, style: str, parts, rng) -> dict:
    return dict(id=f"{split}{prefix}{i:05d}", audio=f"wav/{split}{prefix}{i:05d}.wav", text=text,
                de=translate(parts) if parts else "", obj=parts["obj"] if parts else "", style=style,
                gender=flite.gender(spk[0]), speaker=flite.speaker_name(spk),
                synth=[(text, spk, flite.style_settings(style, rng))])


def draw_clips(split: str, n: int, sents, rng: np.random.Generator) -> List[dict]:
    """Single-utterance clips: a sentence, a speaker of the split and a speaking style each.

    Args:
        split (str): ``train``, ``test`` or ``valid`` (test and valid: the held-out speakers).
        n (int): how many.
        sents (Sequence[Tuple[str, dict]]): the sentences to draw from (``tables.all_sentences`` entries).
        rng (np.random.Generator): the corpus's generator.

    Returns:
        List[dict]: the clips (rows.py lists their keys), each with ``synth`` for ``flite.synth_clip``.
    """
    spks = flite.speakers(split)
    out = []
    for i in range(n):
        text, parts = sents[int(rng.integers(len(sents)))]
        spk = spks[int(rng.integers(len(spks)))]
        out.append(_clip(split, i, "", text, spk, list(STYLES)[int(rng.integers(4))], parts, rng))
    return out


def draw_sv_clips(split: str, n: int, sents, rng: np.random.Generator) -> List[dict]:
    """Two-utterance clips in the neutral style: alternately one speaker twice and two different speakers
    (another voice, or the same voice with another warp or pitch).

    Args:
        split (str): ``train``, ``test`` or ``valid``.
        n (int): how many.
        sents (Sequence[Tuple[str, dict]]): the sentences to draw from.
        rng (np.random.Generator): the corpus's generator.

    Returns:
        List[dict]: the clips, with ``same`` and two utterances in ``synth``.
    """
    spks = flite.speakers(split)
    out = []
    for i in range(n):
        same = i % 2 == 0
        a = spks[int(rng.integers(len(spks)))]
        b = a
        while not same and b == a:
            b = spks[int(rng.integers(len(spks)))]
        (t1, p1), (t2, _) = (sents[int(rng.integers(len(sents)))] for _ in range(2))
        clip = _clip(split, i, "sv", f"{t1} {t2}", a, "neutral", p1, rng)
        clip["same"] = same
        clip["synth"].append((t2, b, flite.style_settings("neutral", rng)))
        out.append(clip)
    return out


def question_split(seed: int) -> Dict[str, List[tuple]]:
    """The spoken questions of each split: a seeded ``TEST_QUESTION_PERCENT`` held out for valid and test.

    Args:
        seed (int): the corpus seed.

    Returns:
        Dict[str, List[tuple]]: ``train`` and ``test`` -> (question, answer, answer words) entries.
    """
    held = [q for q in SQQA_QUESTIONS if tables._h(seed, "sqqa", q[0]) % 100 < TEST_QUESTION_PERCENT]
    return {"train": [q for q in SQQA_QUESTIONS if q not in held], "test": held}


def draw_question_clips(split: str, questions: Sequence[tuple], repeats: int, rng: np.random.Generator) -> List[dict]:
    """Spoken questions, each by ``repeats`` speakers of the split, neutral or another style.

    Args:
        split (str): ``train``, ``test`` or ``valid``.
        questions (Sequence[tuple]): (question, answer, answer words) entries.
        repeats (int): renditions of each question.
        rng (np.random.Generator): the corpus's generator.

    Returns:
        List[dict]: clips with ``answer`` and ``answer_words`` (what SQQA rows answer and are scored by).
    """
    spks = flite.speakers(split)
    out = []
    for k in range(repeats):
        for q, answer, words in questions:
            spk = spks[int(rng.integers(len(spks)))]
            clip = _clip(split, len(out), "q", q, spk, list(STYLES)[int(rng.integers(4))], None, rng)
            clip.update(answer=answer, answer_words=list(words))
            out.append(clip)
    return out


def prose_split(seed: int) -> Dict[str, List[str]]:
    """The prose sentences of each split: a seeded ``TEST_PROSE_PERCENT`` held out for valid and test.

    Args:
        seed (int): the corpus seed.

    Returns:
        Dict[str, List[str]]: ``train`` and ``test`` -> sentences, in the file's order.
    """
    held = {s for s in PROSE if tables._h(seed, "prose", s) % 100 < TEST_PROSE_PERCENT}
    return {"train": [s for s in PROSE if s not in held], "test": [s for s in PROSE if s in held]}


def draw_prose_clips(split: str, n: int, sentences: Sequence[str], rng: np.random.Generator) -> List[dict]:
    """Prose clips (ASR only: no translation or object): the sentences in turn, ``n`` in all (a sentence again
    after all have been spoken), each by a speaker of the split in one of the styles.

    Args:
        split (str): ``train``, ``test`` or ``valid``.
        n (int): how many.
        sentences (Sequence[str]): ``prose_split``'s sentences of the split.
        rng (np.random.Generator): the corpus's generator.

    Returns:
        List[dict]: the clips (ids ``<split>p<i>``).
    """
    spks = flite.speakers(split)
    out = []
    for i in range(n):
        spk = spks[int(rng.integers(len(spks)))]
        out.append(_clip(split, i, "p", sentences[i % len(sentences)], spk, list(STYLES)[int(rng.integers(4))],
                         None, rng))
    return out


def draw_all(seed: int, sizes: dict, train_s, test_s, rng: np.random.Generator) -> Dict[str, List[dict]]:
    """Every clip of the flite corpus, by role (the keys ``rows.real_task_manifests`` reads).

    Args:
        seed (int): the corpus seed (which questions are held out).
        sizes (dict): ``corpus.FLITE_SIZES[size]``.
        train_s, test_s: the training and the held-out sentences.
        rng (np.random.Generator): the corpus's generator.

    Returns:
        Dict[str, List[dict]]: role -> clips.
    """
    qs, prose = question_split(seed), prose_split(seed)
    n_valid_q = max(1, len(qs["test"]) // 5)
    n_test_p = min(sizes["prose_test"], len(prose["test"]) - sizes["prose_valid"])
    clips = {"train": draw_clips("train", sizes["train"], train_s, rng),
            "test": draw_clips("test", sizes["test"], test_s, rng),
            "valid": draw_clips("valid", sizes["valid"], test_s, rng),
            "sv_train": draw_sv_clips("train", sizes["sv_train"], train_s, rng),
            "sv_test": draw_sv_clips("test", sizes["sv_test"], test_s, rng),
            "sv_valid": draw_sv_clips("valid", sizes["valid"], test_s, rng),
            "sqqa_train": draw_question_clips("train", qs["train"], sizes["sqqa_repeats"], rng),
            "sqqa_valid": draw_question_clips("valid", qs["test"][:n_valid_q], 1, rng),
            "sqqa_test": draw_question_clips("test", qs["test"], 1, rng)}
    # drawn last, so the clips above (and their cached encoder outputs) are those of a corpus without prose
    clips["prose_train"] = draw_prose_clips("train", sizes["prose_train"], prose["train"], rng)
    clips["prose_test"] = draw_prose_clips("test", n_test_p, prose["test"][:n_test_p], rng)
    clips["prose_valid"] = draw_prose_clips("valid", sizes["prose_valid"], prose["test"][n_test_p:], rng)
    return clips
