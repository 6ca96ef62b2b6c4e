"""Instruction manifests (TSV, schema in manifests/README.md): read and validate; fairseq's wav2vec/HuBERT
manifests, speech_to_text TSVs and the reference's files are read as instruction rows (manifest_formats.py).

``read_manifest`` turns a manifest into :class:`ManifestRow` objects (one row's cells: manifest_row.py)
plus a :class:`ManifestReport`. A bad row (wrong number of fields, non-numeric ``n_frames``,
unparseable ``with_speech``, empty id or duplicate id, empty prompt on a text-only row, empty target,
mismatched multi-round lists, bytes that are not UTF-8, unreadable audio, text over a token limit)
stops reading with a ManifestError naming ``file:line`` -- or, with ``skip_bad=True``, is left out,
counted and logged. Missing required columns are always fatal. Line numbers are physical lines of the
file, the header being line 1.

Console script: ``wavllm-validate-manifest`` (:func:`validate_main`).
"""
import argparse
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..errors import AudioError, ManifestError, WavLLMInputError
from .audio import SILENCE_PEAK, audio_num_frames, load_audio
from .manifest_formats import FORMATS, decode_text, row_source  # noqa: F401  (decode_text: importable from here)
from .manifest_row import (NO_AUDIO_CELLS, REQUIRED_COLUMNS, BadRow, ManifestRow, escape_cell,  # noqa: F401
                           parse_row, unescape_cell)  # NO_AUDIO_CELLS and the escapes: importable from here too
from .tokenizer import LlamaTokenizer

_log = logging.getLogger(__name__)

SPLIT_PREFIXES = ("train_", "valid_", "test_", "dev_")
POOL_SUFFIXES = ("_unseen", "_seen")
# the reference's test-set file names (microsoft/SpeechT5 WavLLM/wavllm/test_data) -> this project's tasks;
# any <xx>2<yy> (en2de, en2ja, en2zh) is ST
REFERENCE_TASKS = {"emo": "er", "sqa": "sqa", "sqqa": "sqqa", "gaokao": "sqa", "ii-task": "multi",
                   "cot-task": "cot", "cot-task-story": "cot"}
_LANGUAGE_PAIR = re.compile(r"^[a-z]{2,3}2[a-z]{2,3}$", re.IGNORECASE)
_MAX_LOGGED_WARNINGS = 10  # placeholder n_frames on every row would flood the training log
_HINT = ("list every bad row with `wavllm-validate-manifest {path}`, or skip bad rows with "
         "task.skip_bad_rows=true")


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
    ``skipped`` the bad rows left out (equal to ``bad`` with ``skip_bad``); ``format`` says how the file was read.
    """

    path: str
    format: str = ""
    rows: int = 0
    ok: int = 0
    bad: int = 0
    skipped: int = 0
    problems: List[Problem] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    @property
    def counts(self) -> Dict[str, int]:
        """rows, ok, bad and skipped, by name."""
        return {"rows": self.rows, "ok": self.ok, "bad": self.bad, "skipped": self.skipped}

    def problem_lines(self) -> List[str]:
        """The bad rows as text.

        Returns:
            List[str]: one ``file:line: id=...: reason: message`` line per bad row.
        """
        return [f"{self.path}:{p.line}: id={p.id}: {p.reason}: {p.message}" for p in self.problems]


def task_from_filename(path: str) -> str:
    """Default task of a manifest: its file stem without a split prefix and a seen/unseen suffix, the
    reference's test-set names mapped to this project's tasks (:data:`REFERENCE_TASKS`).

    ``train_asr.tsv`` -> ``asr``; ``test_st_unseen.tsv`` -> ``st``; ``en2de.tsv`` -> ``st``; ``SQA.tsv`` -> ``sqa``.

    Args:
        path (str): the manifest file.

    Returns:
        str: the task name.
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
    if stem.lower() in REFERENCE_TASKS:
        return REFERENCE_TASKS[stem.lower()]
    return "st" if _LANGUAGE_PAIR.match(stem) else stem


# ------------------------------------------------------------------------------------------ reading
def read_manifest(path: str, *, task: Optional[str] = None, check_audio: Union[bool, str] = False,
                  skip_bad: bool = False, max_audio_seconds: Optional[float] = None,
                  token_counter: Optional[Callable[[str], int]] = None, max_text_tokens: Optional[int] = None,
                  require_target: bool = True, fmt: str = "auto", audio_root: Optional[str] = None,
                  prompt_pool: str = "",
                  logger: Optional[logging.Logger] = None) -> Tuple[List[ManifestRow], ManifestReport]:
    """Read and check a manifest (an instruction manifest, or another format: manifest_formats.py); returns the
    good rows and a report.

    ``check_audio``: False trusts the cells; True (or ``"header"``) reads every speech row's audio header
    (missing/empty/unsupported/truncated files, true length, ``max_audio_seconds``); ``"full"`` decodes
    every clip (also damaged streams and silence). A numeric but wrong ``n_frames`` is then a warning and
    the true length is used. ``token_counter`` with ``max_text_tokens`` bounds the text of a row (all
    prompts and targets). ``require_target=False`` accepts empty targets (manifests only decoded).
    Task of a row: its ``task`` cell, else ``task``, else :func:`task_from_filename` (wav2vec and S2T rows:
    ``asr`` or ``st``, see manifest_formats.py).

    Args:
        path (str): the manifest file.
        task (Optional[str]): the default task of its rows.
        check_audio (Union[bool, str]): False, True / ``"header"`` or ``"full"`` (see above).
        skip_bad (bool): leave bad rows out (counted and logged) instead of raising.
        max_audio_seconds (Optional[float]): longer clips are bad rows (with ``check_audio``).
        token_counter (Optional[Callable[[str], int]]): tokens of a text.
        max_text_tokens (Optional[int]): the most prompt + target tokens of a row.
        require_target (bool): an empty target is a bad row.
        fmt (str): the file's format, one of ``manifest_formats.FORMATS`` (``auto``: told by its first line).
        audio_root (Optional[str]): the folder relative audio paths start from (None: the manifest's folder).
        prompt_pool (str): the prompt pool of rows without a prompt column (wav2vec, S2T); "" = each task's seen pool.
        logger (Optional[logging.Logger]): where warnings go (default: this module's).

    Returns:
        Tuple[List[ManifestRow], ManifestReport]: the good rows and the report.

    Raises:
        ManifestError: naming ``file:line``, for a bad header, or a bad row without ``skip_bad``.
    """
    if check_audio not in (False, True, "header", "full"):
        raise ValueError(f"check_audio must be False, True, 'header' or 'full', got {check_audio!r}")
    log = logger or _log
    report = ManifestReport(path)
    lines = _read_lines(path)
    source = row_source(path, lines, fmt, prompt_pool, require_target)
    report.format = source.describe
    columns = source.columns
    root = audio_base(path, audio_root)
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
            cells = source.cells(report.rows - 1, raw)
            row_id = (cells[id_col].strip() or None) if id_col < len(cells) else None
            row = _parse_line(raw, cells, row_id, columns, line, seen, default_task, require_target, source.literal)
            if check_audio and row.with_speech:
                _check_audio(row, root, check_audio == "full", max_audio_seconds, path, report)
            if token_counter is not None and max_text_tokens is not None:
                _check_text_length(row, token_counter, max_text_tokens)
        except BadRow as e:
            _bad_row(report, line, row_id or e.row_id, e, skip_bad, log)
            continue
        rows.append(row)
        report.ok += 1
    for w in report.warnings[:_MAX_LOGGED_WARNINGS]:
        log.warning(w)
    if len(report.warnings) > _MAX_LOGGED_WARNINGS:
        log.warning(f"{path}: {len(report.warnings) - _MAX_LOGGED_WARNINGS} more warnings; list them with "
                    f"`wavllm-validate-manifest {path}`")
    return rows, report


def audio_base(path: str, audio_root: Optional[str] = None) -> str:
    """The folder a manifest's relative audio paths start from.

    Args:
        path (str): the manifest file.
        audio_root (Optional[str]): ``task.audio_root`` (relative: to the working directory, as the reference
            resolves it); None or "" for the manifest's own folder.

    Returns:
        str: an absolute folder.
    """
    return os.path.abspath(audio_root) if audio_root else os.path.dirname(os.path.abspath(path))


def _read_lines(path: str) -> List[bytes]:
    """The file's lines (a final newline ends the last line; it does not open an empty one)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ManifestError(f"cannot read the manifest ({e.strerror})", file=path, reason="missing") from None
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def _parse_line(raw: bytes, cells: List[str], row_id: Optional[str], columns: List[str], line: int,
                seen: Dict[str, int], default_task: str, require_target: bool, literal: bool) -> ManifestRow:
    """A data line -> its row; ``seen`` (id -> line of its first row) catches duplicate ids."""
    try:
        decode_text(raw)
    except UnicodeDecodeError as e:
        raise BadRow("encoding", f"not UTF-8 ({e.reason} at byte {e.start} of the line); "
                                 "re-save the manifest as UTF-8") from None
    if len(cells) != len(columns):
        raise BadRow("fields", f"has {len(cells)} tab-separated fields but the header has {len(columns)} "
                               "(write a tab inside a cell as \\t, a newline as \\n)")
    if row_id in seen:
        raise BadRow("duplicate_id", f"id {row_id!r} was already used on line {seen[row_id]}")
    if row_id is not None:
        seen[row_id] = line
    return parse_row(dict(zip(columns, cells)), line, default_task, require_target, literal)


def _check_text_length(row: ManifestRow, token_counter: Callable[[str], int], max_text_tokens: int) -> None:
    n = sum(token_counter(p) + token_counter(t) for p, t in row.turns)
    if n > max_text_tokens:
        raise BadRow("too_long_text", f"prompt + target text is {n} tokens, over the limit of "
                                      f"{max_text_tokens}; shorten the row")


def _bad_row(report: ManifestReport, line: int, row_id: Optional[str], err: BadRow, skip_bad: bool,
             log: logging.Logger) -> None:
    """Count a bad row in ``report``; raise the ManifestError unless ``skip_bad`` (then log it)."""
    path = report.path
    report.bad += 1
    report.problems.append(Problem(line, row_id, err.reason, err.message))
    if not skip_bad:
        raise ManifestError(f"id={row_id}: {err.message}; {_HINT.format(path=path)}", file=path, row=line,
                            reason=err.reason) from None
    report.skipped += 1
    log.warning(f"{path}:{line}: id={row_id}: skipping bad row ({err.reason}): {err.message}")


def _check_audio(row: ManifestRow, root: str, full: bool, max_seconds, path: str, report: ManifestReport) -> None:
    try:
        if full:
            wav = load_audio(row.audio, root, max_seconds=max_seconds, segment=row.segment)
            true_len = len(wav)
            peak = float(abs(wav).max())
            if peak < SILENCE_PEAK:  # valid audio (it is decoded as it is), but worth a look
                report.warnings.append(f"{path}:{row.line}: id={row.id}: warning: the audio is silent "
                                       f"(peak |x| = {peak:.1e})")
        else:
            true_len = audio_num_frames(row.audio, root, max_seconds=max_seconds, segment=row.segment)
    except AudioError as e:
        raise BadRow(e.reason, str(e)) from None
    if true_len != row.n_frames:
        report.warnings.append(f"{path}:{row.line}: id={row.id}: warning: n_frames is {row.n_frames} but the "
                               f"audio has {true_len} samples at 16 kHz; using {true_len}")
        row.n_frames = true_len


# ------------------------------------------------------------------------------------------ validate
def validate_main(argv: Optional[Sequence[str]] = None) -> int:
    """``wavllm-validate-manifest``: check every row of one or more manifests.

    Args:
        argv (Optional[Sequence[str]]): the command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        int: the exit status: 1 if any row is bad or a manifest unreadable, else 0.
    """
    p = argparse.ArgumentParser(
        prog="wavllm-validate-manifest",
        description="Check instruction manifests: columns, numbers, text, duplicate ids and (unless --no-audio) "
                    "that every clip decodes. Prints one line per bad row and warning, then "
                    "'rows <n> ok <n> bad <n>'; exits 1 when a row is bad.")
    p.add_argument("manifests", nargs="+", metavar="MANIFEST",
                   help="instruction TSV file(s), or fairseq wav2vec/HuBERT manifests or speech_to_text TSVs")
    p.add_argument("--format", default="auto", choices=FORMATS,
                   help="how to read them (task.manifest_format; default: told by each file's first line)")
    p.add_argument("--audio-root", default=None,
                   help="folder relative audio paths start from (task.audio_root; default: each manifest's folder)")
    p.add_argument("--prompt-pool", default="", help="prompt pool of rows without prompts (task.prompt_pool)")
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
                                      require_target=not args.allow_empty_target, fmt=args.format,
                                      audio_root=args.audio_root, prompt_pool=args.prompt_pool, logger=quiet)
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
