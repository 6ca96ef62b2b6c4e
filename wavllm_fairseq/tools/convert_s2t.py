"""``wavllm-convert-s2t-manifest``: a fairseq speech_to_text manifest (id, audio, n_frames, tgt_text, ...)
-> an instruction manifest of one task, each row given a prompt drawn from a prompt pool (a file of one
prompt per line, a shipped pool's name such as ``asr.seen``, or a list; data/prompt_pools.py), deterministically
per utterance id. The task reads such manifests directly too (``task.manifest_format``); this converter writes
them out once, to edit or to check.
"""
import argparse
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Union

from ..data.audio import audio_num_frames, parse_audio_spec
from ..data.manifest import NO_AUDIO_CELLS, decode_text, escape_cell
from ..data.prompt_pools import pick, read_pool
from ..errors import AudioError, ManifestError, WavLLMInputError


def _rebase_audio(cell: str, src_root: str, dst_root: str) -> str:
    """Rewrite an audio cell relative to ``src_root`` so it resolves from ``dst_root`` (absolute paths kept)."""
    spec = parse_audio_spec(cell, src_root)
    m = re.match(r"^(.+\.zip)(:\d+:\d+)$", cell.strip(), re.IGNORECASE)
    raw_path, tail = (m[1], m[2]) if m else (cell.strip(), "")
    if os.path.isabs(os.path.expanduser(raw_path)):
        return cell.strip()
    return os.path.relpath(spec.path, dst_root) + tail


def convert_s2t_manifest(src: str, dst: str, *, task: str, prompts: Union[str, Sequence[str]], seed: int = 0,
                         with_speech: bool = True, target_column: str = "tgt_text", root: Optional[str] = None,
                         check_audio: bool = True) -> Dict[str, int]:
    """Turn a fairseq speech_to_text TSV (``id audio n_frames tgt_text ...``) into an instruction manifest.

    Each row gets a prompt drawn from ``prompts`` (a list, or a file with one per line) by (seed, id),
    ``tgt_text`` from ``target_column``, ``with_speech`` and ``task``; other columns (speaker, src_text,
    ...) are carried (an original ``tgt_text`` replaced by another target column becomes
    ``s2t_tgt_text``). Audio paths relative to ``root`` (default: the S2T file's folder) are rewritten
    to resolve from ``dst``'s folder. With ``check_audio`` the 16 kHz length is read from each audio
    header (S2T ``n_frames`` may count source-rate samples); unreadable audio keeps its value and is
    counted.

    Args:
        src (str): the speech_to_text TSV.
        dst (str): the instruction manifest to write.
        task (str): the ``task`` cell of every row.
        prompts (Union[str, Sequence[str]]): the prompt pool: a file of one prompt per line, a shipped pool's name
            (``asr.seen``), or a list.
        seed (int): chooses each row's prompt (deterministic per id).
        with_speech (bool): the ``with_speech`` cell of every row.
        target_column (str): the S2T column that becomes ``tgt_text``.
        root (Optional[str]): the folder the S2T audio paths are relative to (default: ``src``'s folder).
        check_audio (bool): read ``n_frames`` from the audio headers.

    Returns:
        Dict[str, int]: ``rows``, ``prompts`` (the pool's size), ``measured`` and ``unreadable`` audio.
    """
    pool = read_pool(prompts)
    text_lines = _read_lines(src)
    columns = text_lines[0].lstrip("\ufeff").split("\t")
    missing = [c for c in ("id", "audio", "n_frames", target_column) if c not in columns]
    if missing:
        raise ManifestError(f"missing column(s) {', '.join(missing)} (header has: {', '.join(columns)})", file=src,
                            row=1, reason="header")
    ours = ["id", "audio", "n_frames", "prompt", "tgt_text", "with_speech", "task"]
    renamed = {"tgt_text": "s2t_tgt_text"} if target_column != "tgt_text" else {}
    carried = [c for c in columns if c not in ours and c != target_column] + [
        renamed[c] for c in columns if c in renamed]
    src_root = os.path.abspath(root) if root else os.path.dirname(os.path.abspath(src))
    dst_root = os.path.dirname(os.path.abspath(dst))
    os.makedirs(dst_root, exist_ok=True)
    out = ["\t".join(ours + carried)]
    measured = unreadable = 0
    for line, text in enumerate(text_lines[1:], start=2):
        if not text.strip():
            continue
        cells = text.split("\t")
        if len(cells) != len(columns):
            raise ManifestError(f"has {len(cells)} tab-separated fields but the header has {len(columns)}",
                                file=src, row=line, reason="fields")
        r = dict(zip(columns, cells))
        r.update({renamed[c]: r[c] for c in renamed})
        audio = _rebase_audio(r["audio"], src_root, dst_root) if r["audio"].strip() not in NO_AUDIO_CELLS else "-"
        n_frames = r["n_frames"].strip()
        if check_audio and with_speech:
            try:
                n_frames = str(audio_num_frames(audio, dst_root))
                measured += 1
            except AudioError:
                unreadable += 1
        prompt = pool[pick(seed, r["id"], len(pool))]
        values = [r["id"], audio, n_frames, escape_cell(prompt), escape_cell(r[target_column]), str(with_speech),
                  task] + [escape_cell(r[c]) for c in carried]
        out.append("\t".join(values))
    tmp = dst + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(out) + "\n")
    os.replace(tmp, dst)
    return {"rows": len(out) - 1, "prompts": len(pool), "measured": measured, "unreadable": unreadable}


def _read_lines(src: str) -> List[str]:
    """The S2T file's lines, decoded (header first; a last empty line dropped); errors name the file and row."""
    try:
        with open(src, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as e:
        raise ManifestError(f"cannot read the S2T manifest ({e.strerror})", file=src, reason="missing") from None
    if lines and lines[-1] == b"":
        lines.pop()
    if not lines:
        raise ManifestError("empty file; expected a header 'id audio n_frames tgt_text ...'", file=src, row=1,
                            reason="header")
    try:
        return [decode_text(b) for b in lines]
    except UnicodeDecodeError:
        bad = next(i for i, b in enumerate(lines, 1) if not _is_utf8(b))
        raise ManifestError("not UTF-8", file=src, row=bad, reason="encoding") from None


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def convert_s2t_main(argv: Optional[Sequence[str]] = None) -> int:
    """``wavllm-convert-s2t-manifest`` (fairseq speech_to_text TSV -> instruction manifest) on ``argv`` (default:
    ``sys.argv[1:]``); returns the exit status (1 on an input error)."""
    p = argparse.ArgumentParser(
        prog="wavllm-convert-s2t-manifest",
        description="Convert a fairseq speech_to_text TSV (id audio n_frames tgt_text speaker ...) into an "
                    "instruction manifest (id audio n_frames prompt tgt_text with_speech task + the other columns).")
    p.add_argument("--input", required=True, help="fairseq S2T TSV")
    p.add_argument("--output", required=True, help="instruction manifest to write")
    p.add_argument("--task", required=True, help="task name written in the task column (asr, st, ...)")
    p.add_argument("--prompts", required=True, help="file with one instruction per line (\\n, \\t escapes allowed), "
                                                    "or a shipped pool's name (asr.seen, st.seen, ...)")
    p.add_argument("--seed", type=int, default=0, help="chooses each row's prompt (deterministic per id)")
    p.add_argument("--root", default=None, help="folder the S2T audio paths are relative to (default: its folder)")
    p.add_argument("--target-column", default="tgt_text", help="S2T column that becomes tgt_text (e.g. src_text)")
    p.add_argument("--keep-n-frames", action="store_true", help="copy n_frames instead of reading audio headers")
    args = p.parse_args(argv)
    try:
        counts = convert_s2t_manifest(args.input, args.output, task=args.task, prompts=args.prompts, seed=args.seed,
                                      target_column=args.target_column, root=args.root,
                                      check_audio=not args.keep_n_frames)
    except WavLLMInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary = (f"wrote {counts['rows']} rows to {args.output} (task {args.task}, {counts['prompts']} prompts, "
               f"seed {args.seed})")
    if not args.keep_n_frames:
        summary += f"; n_frames from audio headers: {counts['measured']}, unreadable audio: {counts['unreadable']}"
    print(summary)
    if counts["unreadable"]:
        print(f"check the unreadable rows with: wavllm-validate-manifest {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(convert_s2t_main())
