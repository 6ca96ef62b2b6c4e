"""One row of an instruction manifest: its cells parsed and checked (``ManifestRow``), and the TSV cell escapes.

The columns are in manifests/README.md; files are read by manifest.py.
"""
import json
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

REQUIRED_COLUMNS = ("id", "audio", "n_frames", "prompt", "tgt_text", "with_speech")
SEGMENT_COLUMNS = ("start_frame", "end_frame")  # the reference's optional span of the audio file
NO_AUDIO_CELLS = {"", "-"}
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


@dataclass
class ManifestRow:
    """One manifest row. ``prompt`` is the first turn's instruction, ``tgt_text`` the last turn's answer.

    ``turns`` holds every (instruction, answer) pair: one pair for a single-turn row, one per entry of
    the JSON lists of a multi-round row. ``audio`` is the raw cell (resolve it against the manifest's
    folder); ``n_frames`` is the true 16 kHz length when the audio was checked, else the cell's value
    (0 on text-only rows with an empty cell). ``line`` is the physical line number (header = 1).
    ``segment`` is the ``[start, end)`` span of the audio file the row reads, in the file's own samples (the
    reference's ``start_frame`` / ``end_frame`` columns), or None for the whole file.
    """

    id: str
    audio: str
    n_frames: int
    prompt: str
    tgt_text: str
    with_speech: bool
    task: str
    line: int
    extra: Dict[str, str] = field(default_factory=dict)
    turns: List[Tuple[str, str]] = field(default_factory=list)
    segment: Optional[Tuple[int, int]] = None


class BadRow(Exception):
    """A bad row: ``reason`` (short, counted by ``skip_bad``) and ``message`` (what is wrong, what to do).

    Args:
        reason (str): e.g. ``fields``, ``empty_target``.
        message (str): the explanation.
        row_id (Optional[str]): the row's id, where the reader could not take it from the cells.
    """

    def __init__(self, reason: str, message: str, row_id: Optional[str] = None):
        super().__init__(message)
        self.reason, self.message, self.row_id = reason, message, row_id


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape_cell(cell: str) -> str:
    """``\\n``, ``\\t``, ``\\r``, ``\\\\`` -> newline, tab, CR, backslash; any other backslash is kept as is.

    Args:
        cell (str): a TSV cell.

    Returns:
        str: its text.
    """
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m[1], m[0]), cell) if "\\" in cell else cell


def escape_cell(text: str) -> str:
    """Inverse of :func:`unescape_cell`: make ``text`` safe for one TSV cell.

    Args:
        text (str): any text.

    Returns:
        str: the cell.
    """
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _json_list(cell: str) -> Optional[List[str]]:
    if not cell.lstrip().startswith("["):
        return None
    try:
        value = json.loads(cell)
    except ValueError:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def _turns(prompt_cell: str, tgt_cell: str, literal: bool) -> List[Tuple[str, str]]:
    """Single turn, or a multi-round row (both cells JSON lists; JSON's escapes replace the TSV ones); a
    ``literal`` row is one turn of the cells as they are."""
    if literal:
        return [(prompt_cell, tgt_cell)]
    prompts, targets = _json_list(prompt_cell), _json_list(tgt_cell)
    if prompts is None and targets is None:
        return [(unescape_cell(prompt_cell), unescape_cell(tgt_cell))]
    if prompts is None or targets is None:
        which = "prompt" if targets is None else "tgt_text"
        raise BadRow("turns", f"{which} is a JSON list but the other is not; a multi-round row needs both "
                               "prompt and tgt_text as JSON lists of equal length")
    if not prompts or len(prompts) != len(targets):
        raise BadRow("turns", f"multi-round lists must be non-empty and of equal length "
                               f"(prompt has {len(prompts)}, tgt_text has {len(targets)})")
    return list(zip(prompts, targets))


def _parse_bool(cell: str) -> bool:
    v = cell.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise BadRow("with_speech", f"with_speech is {cell!r}; write True or False (1/0, yes/no)")


def _parse_n_frames(cell: str, with_speech: bool) -> int:
    v = cell.strip()
    if not with_speech and v in NO_AUDIO_CELLS:
        return 0
    if not re.fullmatch(r"\d+", v):
        raise BadRow("n_frames", f"n_frames is {cell!r}; it must be a whole number of 16 kHz samples "
                                  "(any integer will do if audio is checked: the true length is used)")
    return int(v)


def _parse_segment(cells: Dict[str, str]) -> Optional[Tuple[int, int]]:
    start, end = (cells.get(c, "").strip() for c in SEGMENT_COLUMNS)
    if not start and not end:
        return None
    if not (re.fullmatch(r"\d+", start) and re.fullmatch(r"\d+", end)):
        raise BadRow("segment", f"start_frame is {start!r} and end_frame is {end!r}; both must be whole numbers of "
                                "the audio file's samples (or both empty: the whole file)")
    if int(end) <= int(start):
        raise BadRow("segment", f"the segment [start_frame, end_frame) = [{start}, {end}) is empty; end_frame must "
                                "be larger than start_frame")
    return int(start), int(end)


def parse_row(cells: Dict[str, str], line: int, default_task: str, require_target: bool,
              literal: bool = False) -> ManifestRow:
    """One row's cells -> a ManifestRow, checked (the audio itself is checked by the reader).

    Args:
        cells (Dict[str, str]): column -> raw cell.
        line (int): the row's physical line (header = 1).
        default_task (str): the task of a row without a ``task`` cell.
        require_target (bool): an empty target is a bad row.
        literal (bool): take the text cells as they are, as the reference reads them (csv ``QUOTE_NONE``): no
            ``\\n`` / ``\\t`` / ``\\\\`` escapes, no JSON multi-round lists.

    Returns:
        ManifestRow: the row.

    Raises:
        BadRow: what is wrong with the row.
    """
    row_id = cells["id"].strip()
    if not row_id:
        raise BadRow("empty_id", "the id cell is empty")
    with_speech = _parse_bool(cells["with_speech"])
    audio = cells["audio"].strip()
    if with_speech and audio in NO_AUDIO_CELLS:
        raise BadRow("missing", "with_speech is True but the audio cell is empty")
    n_frames = _parse_n_frames(cells["n_frames"], with_speech)
    turns = _turns(cells["prompt"], cells["tgt_text"], literal)
    for i, (prompt, target) in enumerate(turns):
        turn = f" (turn {i + 1})" if len(turns) > 1 else ""
        if not prompt.strip() and (i > 0 or not with_speech):
            raise BadRow("empty_prompt", f"the prompt{turn} is empty; only a row with speech may leave its "
                                          "(first) instruction empty")
        if require_target and not target.strip():
            raise BadRow("empty_target", f"tgt_text{turn} is empty")
    extra = {k: v if literal else unescape_cell(v) for k, v in cells.items()
             if k not in REQUIRED_COLUMNS and k != "task"}
    task = cells.get("task", "").strip() or default_task
    return ManifestRow(id=row_id, audio=audio, n_frames=n_frames, prompt=turns[0][0], tgt_text=turns[-1][1],
                       with_speech=with_speech, task=task, line=line, extra=extra, turns=turns,
                       segment=_parse_segment(cells) if with_speech else None)
