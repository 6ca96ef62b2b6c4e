"""The manifest formats ``read_manifest`` reads, and how each line becomes the cells of an instruction row.

==============  ===================================================================================================
``instruction`` this project's TSV (manifests/README.md): a header with ``id audio n_frames prompt tgt_text
                with_speech`` in any order; cells unescaped (``\\n``, ``\\t``, ``\\\\``), JSON lists for
                multi-round rows
``reference``   the same columns read as the reference implementation reads them (csv ``QUOTE_NONE``): every
                cell literally, no escapes, no JSON lists
``wav2vec``     fairseq's wav2vec 2.0 / HuBERT manifest (examples/wav2vec/wav2vec_manifest.py): the first line is
                the folder the audio paths start from, then ``<path>\\t<number of samples>``; the transcripts are
                the lines of ``<stem>.wrd`` beside it (else of ``<stem>.ltr``, letters with ``|`` between
                words), paired line by line; every row is ASR
``s2t``         fairseq's speech_to_text TSV (``id audio n_frames tgt_text [speaker src_text src_lang tgt_lang]``,
                audio a path or ``file.zip:offset:length``), cells literally as fairseq reads them; a row is ST
                when its ``tgt_lang`` is set and differs from its ``src_lang`` (English when absent), else ASR
==============  ===================================================================================================

``auto`` (the task's default) tells them apart by the first line: no tab is a wav2vec manifest, a header with
the S2T columns but neither ``prompt`` nor ``with_speech`` is an S2T TSV, anything else an instruction manifest.
The reference's files have the project's columns, so ``auto`` reads them as instruction manifests; their own
test sets hold no backslash and no JSON list, so both readings give them the same text.

wav2vec and S2T rows bring no instruction: each row's prompt is drawn from a prompt pool (prompt_pools.py) by
its id with seed :data:`PROMPT_SEED` (``wavllm-convert-s2t-manifest``'s default seed, so a converted manifest
holds the same prompts). The pool is ``prompt_pool`` (a shipped pool's name, which also names the rows' task,
``st.unseen``, or a file), by default the seen pool of each row's task (``asr.seen``; ``st.seen`` asks for
German, so an ST row to another language needs a pool of its own).
"""
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import ManifestError
from .manifest_row import REQUIRED_COLUMNS, SEGMENT_COLUMNS, BadRow
from .prompt_pools import pick, pool_task, read_pool

FORMATS = ("auto", "instruction", "reference", "wav2vec", "s2t")
LITERAL_FORMATS = ("reference", "wav2vec", "s2t")  # cells taken as they are
S2T_COLUMNS = ("id", "audio", "n_frames", "tgt_text")
ROW_COLUMNS = ["id", "audio", "n_frames", "prompt", "tgt_text", "with_speech", "task"]
PROMPT_SEED = 0
ST_POOL_LANGUAGE = "de"  # the language the shipped ST pools ask for


def decode_text(raw: bytes) -> str:
    """A manifest line's text.

    Args:
        raw (bytes): the line without its ``\\n``.

    Returns:
        str: the line as UTF-8, a trailing CR removed.

    Raises:
        UnicodeDecodeError: for bytes that are not UTF-8.
    """
    return raw.rstrip(b"\r").decode("utf-8")


def _header_cells(raw: bytes) -> List[str]:
    return [c.strip() for c in raw.rstrip(b"\r").decode("utf-8", errors="replace").lstrip("\ufeff").split("\t")]


def read_header(path: str, lines: Sequence[bytes]) -> List[str]:
    """The columns of an instruction manifest, checked.

    Args:
        path (str): the manifest (errors name it).
        lines (Sequence[bytes]): its lines.

    Returns:
        List[str]: the header's columns.

    Raises:
        ManifestError: for an empty file, a header that is not UTF-8, repeated or missing required columns, or
            one segment column without the other.
    """
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
    if sum(c in columns for c in SEGMENT_COLUMNS) == 1:
        raise ManifestError(f"the header has only one of the segment columns {' and '.join(SEGMENT_COLUMNS)}; a "
                            "segment needs both", file=path, row=1, reason="header")
    return columns


def detect_format(lines: Sequence[bytes]) -> str:
    """The format of a manifest from its first line (see the module docstring).

    Args:
        lines (Sequence[bytes]): the file's lines.

    Returns:
        str: ``wav2vec``, ``s2t`` or ``instruction``.
    """
    if not lines:
        return "instruction"
    if b"\t" not in lines[0]:
        return "wav2vec"
    columns = _header_cells(lines[0])
    if all(c in columns for c in S2T_COLUMNS) and "prompt" not in columns and "with_speech" not in columns:
        return "s2t"
    return "instruction"


class RowSource:
    """How one manifest's data lines become instruction cells.

    Args:
        columns (List[str]): the instruction columns the cells are in.
        cells (Callable[[int, bytes], List[str]]): (data row number from 0, the line) -> cells; raises BadRow.
        literal (bool): whether the cells are taken as they are (no escapes, no JSON lists).
        describe (str): what was read, for the log.
    """

    def __init__(self, columns: List[str], cells: Callable[[int, bytes], List[str]], literal: bool, describe: str):
        self.columns, self.cells, self.literal, self.describe = columns, cells, literal, describe


def row_source(path: str, lines: Sequence[bytes], fmt: str, prompt_pool: str = "",
               require_target: bool = True) -> RowSource:
    """The :class:`RowSource` of a manifest in format ``fmt`` (``auto``: :func:`detect_format`).

    Args:
        path (str): the manifest (errors name it).
        lines (Sequence[bytes]): its lines.
        fmt (str): one of :data:`FORMATS`.
        prompt_pool (str): the prompt pool of wav2vec / S2T rows ("" = the seen pool of each row's task).
        require_target (bool): wav2vec rows need transcripts (else a manifest without labels is read with
            empty targets).

    Returns:
        RowSource: its columns and cell maker.

    Raises:
        ManifestError: for an unknown format, a missing header, or missing or miscounted wav2vec labels.
    """
    if fmt not in FORMATS:
        raise ManifestError(f"unknown manifest format {fmt!r}; use one of {', '.join(FORMATS)}", file=path,
                            reason="header")
    fmt = detect_format(lines) if fmt == "auto" else fmt
    if fmt == "wav2vec" and lines:
        return _wav2vec_source(path, lines, _Prompts(prompt_pool), require_target)
    if fmt == "s2t" and lines:
        return _s2t_source(path, lines, _Prompts(prompt_pool))
    return RowSource(read_header(path, lines), lambda i, raw: raw.rstrip(b"\r").decode("utf-8", errors="replace")
                     .split("\t"), fmt == "reference", f"{fmt} manifest")


class _Prompts:
    """Prompts (and tasks) for rows that bring none: ``prompt_pool``, or the seen pool of each row's task."""

    def __init__(self, prompt_pool: str):
        self.fixed = read_pool(prompt_pool) if prompt_pool else None
        self.fixed_task = pool_task(prompt_pool) if prompt_pool else None
        self.name = prompt_pool
        self.pools: Dict[str, List[str]] = {}

    def __call__(self, utt_id: str, task: str, tgt_lang: str = "") -> Tuple[str, str]:
        """(task, prompt) of a row whose own task would be ``task``."""
        task = self.fixed_task or task
        pool = self.fixed
        if pool is None:
            if task == "st" and tgt_lang.lower() != ST_POOL_LANGUAGE:
                raise BadRow("prompt_pool", f"tgt_lang is {tgt_lang!r} and the shipped ST prompts (st.seen) ask for "
                                            "German: set task.prompt_pool (--prompt-pool) to a file of prompts that "
                                            "ask for that language")
            pool = self.pools.get(task) or self.pools.setdefault(task, read_pool(f"{task}.seen"))
        return task, pool[pick(PROMPT_SEED, utt_id, len(pool))]

    def __str__(self) -> str:
        return f"prompt pool {self.name}" if self.name else "prompts from each task's seen pool"


def ltr_to_words(line: str) -> str:
    """A fairseq ``.ltr`` line (letters separated by spaces, ``|`` ending each word) as words.

    Args:
        line (str): e.g. ``H E | S A I D |``.

    Returns:
        str: e.g. ``HE SAID``.
    """
    return " ".join("".join(line.split()).replace("|", " ").split())


def _labels(path: str, n_rows: int, require_target: bool) -> Tuple[List[str], Optional[str]]:
    stem = os.path.splitext(path)[0]
    for ext, convert in ((".wrd", str.strip), (".ltr", ltr_to_words)):
        label_path = stem + ext
        if not os.path.isfile(label_path):
            continue
        try:
            with open(label_path, "rb") as f:
                labels = f.read().decode("utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ManifestError(f"cannot read the transcripts ({e}); one UTF-8 transcript per row",
                                file=label_path, reason="labels") from None
        if labels and labels[-1] == "":
            labels.pop()
        if len(labels) != n_rows:
            raise ManifestError(f"{len(labels)} transcripts for the {n_rows} rows of {path}; fairseq pairs them line "
                                "by line, so both files must have as many lines", file=label_path, reason="labels")
        return [convert(t.rstrip("\r")) for t in labels], label_path
    if require_target:
        raise ManifestError(f"a wav2vec/HuBERT manifest needs its transcripts: neither {stem}.wrd nor {stem}.ltr "
                            "exists (one line per row, as fairseq's examples/wav2vec/libri_labels.py writes)",
                            file=path, reason="labels")
    return [""] * n_rows, None


def _wav2vec_source(path: str, lines: Sequence[bytes], prompts: _Prompts, require_target: bool) -> RowSource:
    try:
        root = decode_text(lines[0]).strip()
    except UnicodeDecodeError:
        raise ManifestError("the first line (the audio folder) is not UTF-8", file=path, row=1,
                            reason="encoding") from None
    if not root:
        raise ManifestError("the first line of a wav2vec/HuBERT manifest must be the folder its audio paths start "
                            "from", file=path, row=1, reason="header")
    n_rows = sum(1 for raw in lines[1:] if raw.rstrip(b"\r").strip(b" "))
    labels, label_path = _labels(path, n_rows, require_target)

    def cells(index: int, raw: bytes) -> List[str]:
        fields = [f.strip() for f in raw.rstrip(b"\r").decode("utf-8", errors="replace").split("\t")]
        if len(fields) != 2 or not fields[1].isdigit():
            raise BadRow("fields", f"a wav2vec/HuBERT row is '<audio path>\\t<number of samples>'; this one has "
                                   f"{len(fields)} tab-separated field(s): {fields!r}")
        if require_target and not labels[index].strip():
            raise BadRow("empty_target", f"its transcript, line {index + 1} of {label_path}, is empty")
        utt_id = os.path.splitext(fields[0])[0]
        task, prompt = prompts(utt_id, "asr")
        return [utt_id, os.path.join(root, fields[0]), fields[1], prompt, labels[index], "True", task]

    labelled = f"transcripts from {label_path}" if label_path else "no transcripts"
    return RowSource(list(ROW_COLUMNS), cells, True, f"wav2vec/HuBERT manifest ({labelled}, {prompts})")


def _s2t_source(path: str, lines: Sequence[bytes], prompts: _Prompts) -> RowSource:
    header = _header_cells(lines[0])
    carried = [c for c in header if c not in ROW_COLUMNS]

    def cells(index: int, raw: bytes) -> List[str]:
        fields = raw.rstrip(b"\r").decode("utf-8", errors="replace").split("\t")
        if len(fields) != len(header):
            raise BadRow("fields", f"has {len(fields)} tab-separated fields but the header has {len(header)}")
        r = dict(zip(header, fields))
        tgt_lang, src_lang = r.get("tgt_lang", "").strip(), r.get("src_lang", "").strip() or "en"
        own = "st" if tgt_lang and tgt_lang.lower() != src_lang.lower() else "asr"
        try:
            task, prompt = prompts(r["id"].strip(), own, tgt_lang)
        except BadRow as e:
            e.row_id = r["id"].strip() or None
            raise
        return [r["id"], r["audio"], r["n_frames"], prompt, r["tgt_text"], "True",
                r.get("task", "").strip() or task] + [r[c] for c in carried]

    return RowSource(list(ROW_COLUMNS) + carried, cells, True, f"speech_to_text TSV ({prompts})")
