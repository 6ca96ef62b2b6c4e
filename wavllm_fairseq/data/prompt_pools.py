"""Prompt pools: the instructions given to rows that bring none of their own (fairseq speech manifests,
``wavllm-convert-s2t-manifest``).

A pool is a UTF-8 file of one prompt per line (``\\n`` and ``\\t`` escapes allowed, blank lines skipped). The
package ships a seen and an unseen pool per speech task, ``wavllm_fairseq/data/prompts/<task>.<seen|unseen>.txt``,
which are named ``<task>.<seen|unseen>`` (``asr.seen``, ``st.unseen``); any other pool is given by its path.
A row's prompt is ``pool[pick(seed, row id, len(pool))]``: the same row gets the same prompt in every run, in any
file order and in any subset of the rows.
"""
import hashlib
import os
import re
from typing import List, Optional, Sequence, Union

from ..errors import WavLLMInputError
from .manifest_row import unescape_cell

PROMPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
_NAME = re.compile(r"^(?P<task>[A-Za-z0-9_+-]+)\.(?P<pool>seen|unseen)$")


def shipped_pools() -> List[str]:
    """The names of the pools the package ships.

    Returns:
        List[str]: ``<task>.<seen|unseen>`` names, sorted.
    """
    names = [f[:-4] for f in os.listdir(PROMPT_DIR) if f.endswith(".txt")] if os.path.isdir(PROMPT_DIR) else []
    return sorted(n for n in names if _NAME.match(n))


def pool_path(name_or_path: str) -> str:
    """The file of a pool: an existing file path as it is, else the shipped pool of that name.

    Args:
        name_or_path (str): a file path or a shipped pool name (``asr.seen``).

    Returns:
        str: the pool file.

    Raises:
        WavLLMInputError: for neither an existing file nor a shipped pool (the shipped names are listed).
    """
    if os.path.isfile(name_or_path):
        return name_or_path
    shipped = os.path.join(PROMPT_DIR, name_or_path + ".txt")
    if _NAME.match(name_or_path) and os.path.isfile(shipped):
        return shipped
    raise WavLLMInputError(f"cannot read the prompt file: no such file, and no shipped pool of that name (shipped: "
                           f"{', '.join(shipped_pools())}); give a file of one UTF-8 prompt per line",
                           file=name_or_path, reason="missing")


def pool_task(name_or_path: str) -> Optional[str]:
    """The task a shipped pool's name says (``st.unseen`` -> ``st``); None for a pool given by its path.

    Args:
        name_or_path (str): a pool name or path.

    Returns:
        Optional[str]: the task.
    """
    m = _NAME.match(name_or_path)
    return m["task"] if m and not os.path.isfile(name_or_path) else None


def read_pool(prompts: Union[str, Sequence[str]]) -> List[str]:
    """The prompts of a pool.

    Args:
        prompts (Union[str, Sequence[str]]): a pool name or file (see :func:`pool_path`), or the prompts themselves.

    Returns:
        List[str]: its non-blank prompts, in order.

    Raises:
        WavLLMInputError: for an unreadable or empty pool, naming it.
    """
    where = None
    if isinstance(prompts, str):
        where = pool_path(prompts)
        try:
            with open(where, encoding="utf-8") as f:
                prompts = [unescape_cell(line.rstrip("\r\n")) for line in f]
        except (OSError, UnicodeDecodeError) as e:
            raise WavLLMInputError(f"cannot read the prompt file ({e}); give one UTF-8 prompt per line",
                                   file=where, reason="missing") from None
    pool = [p for p in prompts if p.strip()]
    if not pool:
        raise WavLLMInputError("the prompt pool is empty; give at least one prompt", file=where, reason="empty_prompt")
    return pool


def pick(seed: int, utt_id: str, n: int) -> int:
    """A row's position in a pool of ``n``, from (seed, row id) alone: independent of row order and subsetting.

    Args:
        seed (int): the choice's seed.
        utt_id (str): the row id.
        n (int): the pool's size.

    Returns:
        int: an index in ``[0, n)``.
    """
    digest = hashlib.sha256(f"{seed}\t{utt_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n
