"""The text normaliser that the scorer and the instruction augmenter share.

``wavllm-score`` (``scoring``) compares hypotheses and targets after ``normalise``: WER, label matching,
containment and the multi-task checks. ``PromptAugmenter`` (``prompt_augment``) splits training prompts
into ``words`` to find each task's words. Both read this module and neither reads the other, so a change
to the scorer cannot change training. A change here changes both: the prompts the augmenter makes from
a seed (pinned in tests/data/test_prompt_augment.py) and the scores (tests/evaluation/test_scoring.py).
"""
import re
import string
from typing import List

NORMALISER = "lower-case, punctuation removed (apostrophes inside words kept), whitespace collapsed"

_PUNCT = "".join(c for c in string.punctuation if c != "'")
_PUNCT_RE = re.compile("[" + re.escape(_PUNCT) + "\u2018\u2019\u201c\u201d\u00bf\u00a1\u2014\u2013]")
_QUOTE_RE = re.compile(r"(?<![a-z0-9])'|'(?![a-z0-9])")  # a ' not inside a word is a quote, not an apostrophe


def normalise(text: str) -> str:
    """Lower-case, punctuation to spaces (apostrophes inside words kept), whitespace collapsed.

    Args:
        text (str): any text.

    Returns:
        str: the normalised text.
    """
    text = _QUOTE_RE.sub(" ", _PUNCT_RE.sub(" ", text.lower()))
    return " ".join(text.split())


def words(text: str) -> List[str]:
    """The words of ``text`` after ``normalise`` (any alphabet: only punctuation and whitespace split).

    Args:
        text (str): any text.

    Returns:
        List[str]: its words.
    """
    return normalise(text).split()
