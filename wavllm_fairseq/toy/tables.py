"""The toy corpus's tables: the grammar and its German, the voices and speaking styles, the task
formats and the prompt pools; and the sentences, translations and voice split they define.

The tables are data: ``data/lexicon.json`` (words), ``data/voices.json`` (espeak-ng voices, styles),
``data/tasks.json`` (answer markers, multi-task combinations and connectors, text-only instruction
templates with the answer each asks for), and the prompt pools of the speech tasks,
``wavllm_fairseq/data/prompts/<task>.{seen,unseen}.txt`` (one prompt per line, UTF-8, the format
``wavllm-convert-s2t-manifest --prompts`` reads); all of them package data. ``corpus`` builds the corpus
from them and stage 0 reads the grammar and the seen prompts for its LLaMA stand-in.
"""
import functools
import hashlib
import json
import os
import re
from typing import Callable, Dict, List, Tuple

from ..data.manifest import unescape_cell

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # wavllm_fairseq/
# the folder that holds the package (a checkout or site-packages): stage 0's cache key names files relative to it
SOURCE_ROOT = os.path.dirname(PACKAGE_DIR)
PROMPT_DIR = os.path.join(PACKAGE_DIR, "data", "prompts")
SPEECH_TASKS = ("asr", "st", "sv", "er", "gender", "sqa")  # each has PROMPT_DIR/<task>.{seen,unseen}.txt


def _data(name: str) -> dict:
    with open(os.path.join(DATA_DIR, name), encoding="utf-8") as f:
        return json.load(f)


_LEXICON, _VOICES, _TASKS = _data("lexicon.json"), _data("voices.json"), _data("tasks.json")
# spoken questions of the SQQA task: (question, answer, words any of which makes an answer right)
SQQA_QUESTIONS: List[Tuple[str, str, List[str]]] = [tuple(q) for q in _data("sqqa.json")["questions"]]
# plain English sentences outside the grammar (the flite corpus's open-vocabulary ASR rows)
PROSE: List[str] = _data("prose.json")["sentences"]

# language: the grammar's words and their German
DETS: List[str] = _LEXICON["dets"]
ADJS: List[str] = _LEXICON["adjs"]
NOUNS: List[str] = _LEXICON["nouns"]
VERBS: List[str] = _LEXICON["verbs"]
OBJECTS: List[str] = _LEXICON["objects"]
PLACES: List[str] = _LEXICON["places"]
DE: Dict[str, str] = _LEXICON["german"]
DE_PLACES: Dict[str, str] = _LEXICON["german_places"]

# voices: accent x variant; TEST_VARIANTS are held out in every accent. STYLES: name -> (pitch offset,
# speed factor, amplitude)
ACCENTS: List[str] = _VOICES["accents"]
FEMALE: List[str] = _VOICES["female"]
MALE: List[str] = _VOICES["male"]
TEST_VARIANTS: List[str] = _VOICES["test_variants"]
STYLES: Dict[str, Tuple[int, float, int]] = {k: tuple(v) for k, v in _VOICES["styles"].items()}
# the real small recipe's flite speakers and styles (flite.py)
FLITE: dict = _VOICES["flite"]

# tasks: answer markers, multi-task combinations and connectors, text-only instruction templates
MARKERS: Dict[str, str] = _TASKS["markers"]
MULTI: List[Tuple[str, ...]] = [tuple(m) for m in _TASKS["multi"]]
CONNECTORS: Dict[int, List[str]] = {int(k): v for k, v in _TASKS["connectors"].items()}
# what an IT template (data/tasks.json: [template, answer]) asks for about its word
IT_ANSWERS: Dict[str, Callable[[str], str]] = {
    "german": lambda w: DE[w],
    "twice": lambda w: f"{w} {w}",
    "spell": lambda w: "-".join(w),
    "first_letter": lambda w: w[0],
    "upper": lambda w: w.upper(),
}


def _it_templates(pool: str) -> List[Tuple[str, Callable[[str], str]]]:
    return [(t, IT_ANSWERS[kind]) for t, kind in _TASKS["it_templates"][pool]]


IT_TEMPLATES_SEEN = _it_templates("seen")
IT_TEMPLATES_UNSEEN = _it_templates("unseen")


def read_prompt_file(path: str) -> List[str]:
    """The prompts of a pool file: one per line, UTF-8, ``\\n``/``\\t`` escapes allowed, blank lines
    skipped (the format of ``wavllm-convert-s2t-manifest --prompts``).

    Args:
        path (str): the pool file.

    Returns:
        List[str]: its prompts, in file order.
    """
    try:
        with open(path, encoding="utf-8") as f:
            pool = [unescape_cell(line.rstrip("\r\n")) for line in f]
    except FileNotFoundError:
        raise FileNotFoundError(f"toy prompt pool {path} is missing: the package ships the prompt pools in "
                                "wavllm_fairseq/data/prompts/ (reinstall it if they are gone)") from None
    pool = [p for p in pool if p.strip()]
    if not pool:
        raise ValueError(f"toy prompt pool {path} holds no prompt")
    return pool


@functools.lru_cache(maxsize=None)
def prompt_pools(folder: str = PROMPT_DIR) -> Dict[str, Tuple[List[str], List[str]]]:
    """The seen and unseen prompt pools of every speech task.

    Args:
        folder (str): where ``<task>.{seen,unseen}.txt`` are (default: the package's ``PROMPT_DIR``).

    Returns:
        Dict[str, Tuple[List[str], List[str]]]: task -> (seen prompts, unseen prompts).
    """
    return {task: tuple(read_prompt_file(os.path.join(folder, f"{task}.{pool}.txt")) for pool in ("seen", "unseen"))
            for task in SPEECH_TASKS}


def pool_prompts(task: str, pool: str) -> List[str]:
    """The prompts of one pool of a speech task.

    Args:
        task (str): one of ``SPEECH_TASKS``.
        pool (str): ``seen`` or ``unseen``.

    Returns:
        List[str]: the pool's prompts.
    """
    return prompt_pools()[task][0 if pool == "seen" else 1]


@functools.lru_cache(maxsize=None)
def task_pool(task: str, pool: str) -> List[str]:
    """One pool of any task with a pool file (``SPEECH_TASKS`` and the real recipe's ``sqqa`` and ``cot``).

    Args:
        task (str): the task.
        pool (str): ``seen`` or ``unseen``.

    Returns:
        List[str]: the pool's prompts.
    """
    return read_prompt_file(os.path.join(PROMPT_DIR, f"{task}.{pool}.txt"))


def __getattr__(name: str):  # ``PROMPTS``, read on first use (a missing prompt file fails there, naming it)
    if name == "PROMPTS":
        return prompt_pools()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


IT_WORDS = NOUNS + OBJECTS + ADJS
TEST_SENTENCE_PERCENT = 15  # a seeded share of the grammar's sentences, held out for valid and test


def _h(*parts) -> int:
    return int(hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:12], 16)


def all_sentences() -> List[Tuple[str, dict]]:
    """Every sentence of the grammar, det [adj] noun verb "the" object [place], in a fixed order (the
    corpus draws sentences by index into this list).

    Returns:
        List[Tuple[str, dict]]: (sentence, its parts: det, adj, noun, verb, obj, place).
    """
    out = []
    for d in DETS:
        for a in ADJS + [""]:
            for n in NOUNS:
                for v in VERBS:
                    for o in OBJECTS:
                        for p in PLACES:
                            words = [d] + ([a] if a else []) + [n, v, "the", o] + ([p] if p else [])
                            out.append((" ".join(words), dict(det=d, adj=a, noun=n, verb=v, obj=o, place=p)))
    return out


def is_grammar_sentence(text: str) -> bool:
    """Whether a transcript is a sentence of the grammar (``all_sentences``), not one of the flite corpus's
    open-vocabulary sentences (prose, spoken questions).

    Args:
        text (str): the transcript.

    Returns:
        bool: True for det [adj] noun verb "the" object [place] with the grammar's words.
    """
    return _grammar_pattern().fullmatch(text.strip()) is not None


@functools.lru_cache(maxsize=1)
def _grammar_pattern() -> "re.Pattern":
    alt = lambda ws: "(?:" + "|".join(re.escape(w) for w in ws if w) + ")"  # noqa: E731
    return re.compile(f"{alt(DETS)} (?:{alt(ADJS)} )?{alt(NOUNS)} {alt(VERBS)} the {alt(OBJECTS)}(?: {alt(PLACES)})?")


def sentence_source(text: str) -> str:
    """``grammar`` or ``open vocabulary``: how a breakdown splits ASR rows (``is_grammar_sentence``)."""
    return "grammar" if is_grammar_sentence(text) else "open vocabulary"


def translate(parts: dict) -> str:
    """The toy German of a sentence: word by word, "den" for the "the" before the object.

    Args:
        parts (dict): the sentence's parts, as ``all_sentences`` gives them.

    Returns:
        str: the German sentence.
    """
    words = [DE[parts["det"]]] + ([DE[parts["adj"]]] if parts["adj"] else []) + [DE[parts["noun"]], DE[parts["verb"]],
                                                                                   "den", DE[parts["obj"]]]
    if parts["place"]:
        words.append(DE_PLACES[parts["place"]])
    return " ".join(words)


def voices(split: str) -> List[Tuple[str, str, str]]:
    """The voices of one split (``TEST_VARIANTS`` in every accent are the test voices).

    Args:
        split (str): ``train`` or ``test``.

    Returns:
        List[Tuple[str, str, str]]: (accent, variant, gender) of each voice.
    """
    out = []
    for acc in ACCENTS:
        for var in FEMALE + MALE:
            if (var in TEST_VARIANTS) == (split == "test"):
                out.append((acc, var, "female" if var in FEMALE else "male"))
    return out


def is_train_sentence(seed: int, text: str) -> bool:
    """Whether a sentence of the grammar is a training sentence of the corpus made with ``seed``.

    Args:
        seed (int): the corpus seed.
        text (str): the sentence.

    Returns:
        bool: True for a training sentence, False for a held-out (valid/test) one.
    """
    return _h(seed, "split", text) % 100 >= TEST_SENTENCE_PERCENT
