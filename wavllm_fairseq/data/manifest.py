"""Instruction manifests (TSV, schema in manifests/README.md): read and validate (converting fairseq S2T
manifests: manifest_convert.py).

``read_manifest`` turns a manifest into :class:`ManifestRow` objects plus a :class:`ManifestReport`.
A bad row (wrong number of fields, non-numeric ``n_frames``, unparseable ``with_speech``, empty id or
duplicate id, empty prompt on a text-only row, empty target, mismatched multi-round lists, bytes that
are not UTF-8, unreadable audio, text over a token limit) stops reading with a ManifestError naming
``file:line`` -- or, with ``skip_bad=True``, is left out, counted and logged. Missing required
columns are always fatal. Line numbers are physical lines of the file, the header being line 1.

Console script: ``wavllm-validate-manifest`` (:func:`validate_main`).
"""
import argparse
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..errors import AudioError, ManifestError, WavLLMInputError
from .audio import SILENCE_PEAK, audio_num_frames, load_audio
from .tokenizer import LlamaTokenizer

_log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("id", "audio", "n_frames", "prompt", "tgt_text", "with_speech")
SPLIT_PREFIXES = ("train_", "valid_", "test_", "dev_")
POOL_SUFFIXES = ("_unseen", "_seen")
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}
NO_AUDIO_CELLS = {"", "-"}
_MAX_LOGGED_WARNINGS = 10  # placeholder n_frames on every row would flood the training log
_HINT = ("list every bad row with `wavllm-validate-manifest {path}`, or skip bad rows with "
         "task.skip_bad_rows=true")


@dataclass
class ManifestRow:
    """One manifest row. ``prompt`` is the first turn's instruction, ``tgt_text`` the last turn's answer.

    ``turns`` holds every (instruction, answer) pair: one pair for a single-turn row, one per entry of
    the JSON lists of a multi-round row. ``audio`` is the raw cell (resolve it against the manifest's
    folder); ``n_frames`` is the true 16 kHz length when the audio was checked, else the cell's value
    (0 on text-only rows with an empty cell). ``line`` is the physical line number (header = 1).
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


@dataclass
class Problem:
    """A bad row: where, which id (None when the id cell could not be read), why (a short reason) and what."""

    line: int
    id: Optional[str]
    reason: str
    message: str


@dataclass
class ManifestReport:
    """What ``read_manifest`` found: row counts, bad rows (``problems``) and ``warnings`` (``file:line: ...``).

    ``rows`` counts data rows (blank lines are not rows), ``ok`` the rows returned, ``bad`` the bad rows,
    ``skipped`` the bad rows left out (equal to ``bad`` with ``skip_bad``).
    """

    path: str
    rows: int = 0
    ok: int = 0
    bad: int = 0
    skipped: int = 0
    problems: List[Problem] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    @property
    def counts(self) -> Dict[str, int]:
        return {"rows": self.rows, "ok": self.ok, "bad": self.bad, "skipped": self.skipped}

    def problem_lines(self) -> List[str]:
        """One ``file:line: id=...: reason: message`` line per bad row."""
        return [f"{self.path}:{p.line}: id={p.id}: {p.reason}: {p.message}" for p in self.problems]


class _BadRow(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


# ------------------------------------------------------------------------------------------ cells
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape_cell(cell: str) -> str:
    """``\\n``, ``\\t``, ``\\r``, ``\\\\`` -> newline, tab, CR, backslash; any other backslash is kept as is."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m[1], m[0]), cell) if "\\" in cell else cell


def escape_cell(text: str) -> str:
    """Inverse of :func:`unescape_cell`: make ``text`` safe for one TSV cell."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def task_from_filename(path: str) -> str:
    """Default task of a manifest: its file stem without a split prefix and a seen/unseen suffix.

    ``train_asr.tsv`` -> ``asr``; ``test_st_unseen.tsv`` -> ``st``.
    """
    stem = os.path.splitext(os.path.basename(path))[0]
    for p in SPLIT_PREFIXES:
        if stem.startswith(p) and len(stem) > len(p):
            stem = stem[len(p):]
            break
    for s in POOL_SUFFIXES:
        if stem.endswith(s) and len(stem) > len(s):
            stem = stem[: -len(s)]
            break
    return stem


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


def _turns(prompt_cell: str, tgt_cell: str) -> List[Tuple[str, str]]:
    """Single turn, or a multi-round row (both cells JSON lists; JSON's escapes replace the TSV ones)."""
    prompts, targets = _json_list(prompt_cell), _json_list(tgt_cell)
    if prompts is None and targets is None:
        return [(unescape_cell(prompt_cell), unescape_cell(tgt_cell))]
    if prompts is None or targets is None:
        which = "prompt" if targets is None else "tgt_text"
        raise _BadRow("turns", f"{which} is a JSON list but the other is not; a multi-round row needs both "
                               "prompt and tgt_text as JSON lists of equal length")
    if not prompts or len(prompts) != len(targets):
        raise _BadRow("turns", f"multi-round lists must be non-empty and of equal length "
                               f"(prompt has {len(prompts)}, tgt_text has {len(targets)})")
    return list(zip(prompts, targets))


def _parse_bool(cell: str) -> bool:
    v = cell.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise _BadRow("with_speech", f"with_speech is {cell!r}; write True or False (1/0, yes/no)")


def _parse_n_frames(cell: str, with_speech: bool) -> int:
    v = cell.strip()
    if not with_speech and v in NO_AUDIO_CELLS:
        return 0
    if not re.fullmatch(r"\d+", v):
        raise _BadRow("n_frames", f"n_frames is {cell!r}; it must be a whole number of 16 kHz samples "
                                  "(any integer will do if audio is checked: the true length is used)")
    return int(v)


# ------------------------------------------------------------------------------------------ reading
def decode_text(raw: bytes) -> str:
    return raw.rstrip(b"\r").decode("utf-8")


def _read_header(path: str, lines: List[bytes]) -> List[str]:
    if not lines:
        raise ManifestError(f"empty file; the first line must be a header with the columns "
                            f"{' '.join(REQUIRED_COLUMNS)}", file=path, row=1, reason="header")
    try:
        header = decode_text(lines[0]).lstrip("\ufeff")
    except UnicodeDecodeError as e:
        raise ManifestError(f"header is not UTF-8 ({e.reason} at byte {e.start})", file=path, row=1,
                            reason="encoding") from None
    columns = [c.strip() for c in header.split("\t")]
    dupes = sorted({c for c in columns if columns.count(c) > 1})
    if dupes:
        raise ManifestError(f"header repeats column(s) {', '.join(dupes)}", file=path, row=1, reason="header")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(f"missing required column(s) {', '.join(missing)} (header has: {', '.join(columns)}); "
                            f"the header needs {' '.join(REQUIRED_COLUMNS)} in any order", file=path, row=1,
                            reason="header")
    return columns


def read_manifest(path: str, *, task: Optional[str] = None, check_audio: Union[bool, str] = False,
                  skip_bad: bool = False, max_audio_seconds: Optional[float] = None,
                  token_counter: Optional[Callable[[str], int]] = None, max_text_tokens: Optional[int] = None,
                  require_target: bool = True,
                  logger: Optional[logging.Logger] = None) -> Tuple[List[ManifestRow], ManifestReport]:
    """Read and check an instruction manifest; returns the good rows and a report.

    ``check_audio``: False trusts the cells; True (or ``"header"``) reads every speech row's audio header
    (missing/empty/unsupported/truncated files, true length, ``max_audio_seconds``); ``"full"`` decodes
    every clip (also damaged streams and silence). A numeric but wrong ``n_frames`` is then a warning and
    the true length is used. ``token_counter`` with ``max_text_tokens`` bounds the text of a row (all
    prompts and targets). ``require_target=False`` accepts empty targets (manifests only decoded).
    Task of a row: its ``task`` cell, else ``task``, else :func:`task_from_filename`.
    """
    if check_audio not in (False, True, "header", "full"):
        raise ValueError(f"check_audio must be False, True, 'header' or 'full', got {check_audio!r}")
    log = logger or _log
    report = ManifestReport(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ManifestError(f"cannot read the manifest ({e.strerror})", file=path, reason="missing") from None
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    columns = _read_header(path, lines)
    root = os.path.dirname(os.path.abspath(path))
    default_task = task or task_from_filename(path)
    id_col = columns.index("id")
    seen: Dict[str, int] = {}  # id -> line of its first row
    rows: List[ManifestRow] = []
    for line, raw in enumerate(lines[1:], start=2):
        if raw.rstrip(b"\r").strip(b" ") == b"":
            report.warnings.append(f"{path}:{line}: blank line ignored")
            continue
        report.rows += 1
        row_id = None
        try:
            cells = raw.rstrip(b"\r").decode("utf-8", errors="replace").split("\t")
            row_id = (cells[id_col].strip() or None) if id_col < len(cells) else None
            try:
                decode_text(raw)
            except UnicodeDecodeError as e:
                raise _BadRow("encoding", f"not UTF-8 ({e.reason} at byte {e.start} of the line); "
                                          "re-save the manifest as UTF-8") from None
            if len(cells) != len(columns):
                raise _BadRow("fields", f"has {len(cells)} tab-separated fields but the header has {len(columns)} "
                                        "(write a tab inside a cell as \\t, a newline as \\n)")
            if row_id in seen:
                raise _BadRow("duplicate_id", f"id {row_id!r} was already used on line {seen[row_id]}")
            if row_id is not None:
                seen[row_id] = line
            row = _parse_row(dict(zip(columns, cells)), line, default_task, require_target)
            if check_audio and row.with_speech:
                _check_audio(row, root, check_audio == "full", max_audio_seconds, path, report)
            if token_counter is not None and max_text_tokens is not None:
                n = sum(token_counter(p) + token_counter(t) for p, t in row.turns)
                if n > max_text_tokens:
                    raise _BadRow("too_long_text", f"prompt + target text is {n} tokens, over the limit of "
                                                   f"{max_text_tokens}; shorten the row")
        except _BadRow as e:
            report.bad += 1
            report.problems.append(Problem(line, row_id, e.reason, e.message))
            if not skip_bad:
                raise ManifestError(f"id={row_id}: {e.message}; {_HINT.format(path=path)}", file=path, row=line,
                                    reason=e.reason) from None
            report.skipped += 1
            log.warning(f"{path}:{line}: id={row_id}: skipping bad row ({e.reason}): {e.message}")
            continue
        rows.append(row)
        report.ok += 1
    for w in report.warnings[:_MAX_LOGGED_WARNINGS]:
        log.warning(w)
    if len(report.warnings) > _MAX_LOGGED_WARNINGS:
        log.warning(f"{path}: {len(report.warnings) - _MAX_LOGGED_WARNINGS} more warnings; list them with "
                    f"`wavllm-validate-manifest {path}`")
    return rows, report


def _parse_row(cells: Dict[str, str], line: int, default_task: str, require_target: bool) -> ManifestRow:
    row_id = cells["id"].strip()
    if not row_id:
        raise _BadRow("empty_id", "the id cell is empty")
    with_speech = _parse_bool(cells["with_speech"])
    audio = cells["audio"].strip()
    if with_speech and audio in NO_AUDIO_CELLS:
        raise _BadRow("missing", "with_speech is True but the audio cell is empty")
    n_frames = _parse_n_frames(cells["n_frames"], with_speech)
    turns = _turns(cells["prompt"], cells["tgt_text"])
    for i, (prompt, target) in enumerate(turns):
        turn = f" (turn {i + 1})" if len(turns) > 1 else ""
        if not prompt.strip() and (i > 0 or not with_speech):
            raise _BadRow("empty_prompt", f"the prompt{turn} is empty; only a row with speech may leave its "
                                          "(first) instruction empty")
        if require_target and not target.strip():
            raise _BadRow("empty_target", f"tgt_text{turn} is empty")
    extra = {k: unescape_cell(v) for k, v in cells.items() if k not in REQUIRED_COLUMNS and k != "task"}
    task = cells.get("task", "").strip() or default_task
    return ManifestRow(id=row_id, audio=audio, n_frames=n_frames, prompt=turns[0][0], tgt_text=turns[-1][1],
                       with_speech=with_speech, task=task, line=line, extra=extra, turns=turns)


def _check_audio(row: ManifestRow, root: str, full: bool, max_seconds, path: str, report: ManifestReport) -> None:
    try:
        if full:
            wav = load_audio(row.audio, root, max_seconds=max_seconds)
            true_len = len(wav)
            peak = float(abs(wav).max())
            if peak < SILENCE_PEAK:  # valid audio (it is decoded as it is), but worth a look
                report.warnings.append(f"{path}:{row.line}: id={row.id}: warning: the audio is silent "
                                       f"(peak |x| = {peak:.1e})")
        else:
            true_len = audio_num_frames(row.audio, root, max_seconds=max_seconds)
    except AudioError as e:
        raise _BadRow(e.reason, str(e)) from None
    if true_len != row.n_frames:
        report.warnings.append(f"{path}:{row.line}: id={row.id}: warning: n_frames is {row.n_frames} but the "
                               f"audio has {true_len} samples at 16 kHz; using {true_len}")
        row.n_frames = true_len


# ------------------------------------------------------------------------------------------ validate
def validate_main(argv: Optional[Sequence[str]] = None) -> int:
    """``wavllm-validate-manifest``: check every row of one or more manifests; exit 1 if any row is bad."""
    p = argparse.ArgumentParser(
        prog="wavllm-validate-manifest",
        description="Check instruction manifests: columns, numbers, text, duplicate ids and (unless --no-audio) "
                    "that every clip decodes. Prints one line per bad row and warning, then "
                    "'rows <n> ok <n> bad <n>'; exits 1 when a row is bad.")
    p.add_argument("manifests", nargs="+", metavar="MANIFEST", help="instruction TSV file(s)")
    p.add_argument("--max-audio-seconds", type=float, default=None, help="clips longer than this are bad rows")
    p.add_argument("--tokenizer-dir", default=None, help="LLaMA tokenizer folder, to count text tokens")
    p.add_argument("--max-text-tokens", type=int, default=None, help="rows with more prompt+target tokens are bad")
    p.add_argument("--no-audio", action="store_true", help="do not open the audio files")
    p.add_argument("--allow-empty-target", action="store_true", help="accept empty tgt_text (decode-only manifests)")
    args = p.parse_args(argv)
    if (args.tokenizer_dir is None) != (args.max_text_tokens is None):
        p.error("--tokenizer-dir and --max-text-tokens go together")
    counter = None
    if args.tokenizer_dir is not None:
        tokenizer = LlamaTokenizer.from_dir(args.tokenizer_dir)
        counter = lambda s: len(tokenizer.encode(s))  # noqa: E731
    quiet = logging.getLogger(__name__ + ".validate")
    quiet.propagate = False
    quiet.addHandler(logging.NullHandler())
    totals = {"rows": 0, "ok": 0, "bad": 0}
    failed = False
    for path in args.manifests:
        try:
            _, report = read_manifest(path, check_audio=False if args.no_audio else "full", skip_bad=True,
                                      max_audio_seconds=args.max_audio_seconds, token_counter=counter,
                                      max_text_tokens=args.max_text_tokens,
                                      require_target=not args.allow_empty_target, logger=quiet)
        except WavLLMInputError as e:
            print(e)
            failed = True
            continue
        for line in report.problem_lines() + report.warnings:
            print(line)
        for k in totals:
            totals[k] += getattr(report, k)
    print(f"rows {totals['rows']} ok {totals['ok']} bad {totals['bad']}")
    sys.stdout.flush()
    return 1 if failed or totals["bad"] else 0


if __name__ == "__main__":
    sys.exit(validate_main())
