"""Audio input: read manifest audio cells as 16 kHz mono float32 (the rate the model's encoders take).

Audio cells are paths (absolute, or relative to the manifest's folder) or fairseq's
``file.zip:offset:length`` (byte offset and length of an uncompressed member). Anything soundfile
(libsndfile) decodes is accepted -- wav, flac, ogg/vorbis/opus, mp3, aiff, ... -- at any sample rate and
channel count: channels are averaged, then the rate is converted to 16 kHz (resample.py: soxr, the
closest measured to the reference's SoX ``rate``).

A row may read a segment of its file (``segment=(start, end)``: the file's own samples ``[start, end)``,
before resampling; the reference's ``start_frame`` / ``end_frame`` columns).

Problems raise :class:`~wavllm_fairseq.errors.AudioError` whose ``reason`` is one of
``missing, empty, corrupt, unsupported, zero_length, too_long, segment``. Rules:

* ``empty``: the file (or zip slice) has 0 bytes. ``zero_length``: it decodes but holds 0 samples.
* ``unsupported`` vs ``corrupt``: when libsndfile cannot open the data, the first bytes (or, failing
  that, the file extension) are compared with formats libsndfile has no decoder for (MP4/M4A/AAC,
  WebM/Matroska, WMA, AMR, numpy ``.npy`` features, zip archives given without ``:offset:length``):
  a match is ``unsupported``, anything else -- random bytes, a header cut short, a decoder error in
  the middle of the stream -- is ``corrupt``.
* A truncated WAV/AIFF (the header promises more data than the file holds) is ``corrupt``: loading
  only what is there would pair half an utterance with its full transcript. WAVs streamed with a
  placeholder size (0 or 0xFFFFFFFF) are accepted.
* ``too_long``: only when the caller sets ``max_seconds`` (by default nothing is too long: the
  Whisper branch runs 30 s windows, as the reference does).
* ``segment``: the segment ends after the file's last sample.
* Feature files (numpy ``.npy``, also inside a zip) are ``unsupported`` with a message saying why: the
  encoders compute their own features from the waveform.
* Silence is valid audio ("Is anyone speaking?"): a clip whose 16 kHz peak |x| is below
  :data:`SILENCE_PEAK` is returned, with a warning naming it.
"""
import functools
import io
import logging
import os
import re
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import soundfile as sf

from ..errors import AudioError
from ..models.frontend import SAMPLE_RATE
from .resample import num_frames_16k, resample_to_16k  # noqa: F401  (public here too: audio in, 16 kHz out)

logger = logging.getLogger(__name__)
SILENCE_PEAK = 1e-4  # a clip whose 16 kHz peak |x| is below this is silent (a warning, not an error)

_ZIP_SPEC = re.compile(r"^(?P<path>.+\.zip):(?P<offset>\d+):(?P<length>\d+)$", re.IGNORECASE)
# first bytes of formats libsndfile cannot decode -> (offset of the magic, magic, name)
_UNSUPPORTED_MAGIC = (
    (4, b"ftyp", "MP4/M4A/AAC"),
    (0, b"\x1a\x45\xdf\xa3", "WebM/Matroska"),
    (0, b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", "WMA/ASF"),
    (0, b"#!AMR", "AMR"),
    (0, b"PK\x03\x04", "zip archive (use file.zip:offset:length for a member)"),
)
_NPY_MAGIC = b"\x93NUMPY"
_FEATURES_PROBLEM = ("holds numpy .npy features, not a waveform: WavLLM reads 16 kHz audio, from which its Whisper "
                     "and WavLM encoders compute their own features; point the audio column at the wav/flac files "
                     "(fairseq's speech_to_text prep scripts write them with --use-audio-input)")
_UNSUPPORTED_EXT = {".m4a", ".mp4", ".aac", ".webm", ".mkv", ".wma", ".amr", ".npy", ".zip"}
# "data : 32000 (should be 15978)" in libsndfile's header log = the data chunk is cut short
_SHORT_CHUNK = re.compile(r"^(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_STREAMING_SIZES = {0, 0xFFFFFFFF, 0x7FFFFFFF, 0xFFFFFFFF - 8}
_INEXACT_LENGTH = {"MP3"}  # formats whose header frame count can be an estimate: decode to count


@dataclass(frozen=True)
class AudioSpec:
    """A resolved audio cell: a file path, plus the byte slice for ``file.zip:offset:length``."""

    path: str
    offset: Optional[int] = None
    length: Optional[int] = None

    def __str__(self) -> str:
        return self.path if self.offset is None else f"{self.path}:{self.offset}:{self.length}"


def parse_audio_spec(spec: str, root: str = "") -> AudioSpec:
    """Resolve an audio cell against ``root`` (the manifest's folder): plain path or ``file.zip:offset:length``.

    Args:
        spec (str): the audio cell.
        root (str): the folder relative paths start from.

    Returns:
        AudioSpec: the normalised path and, for a zip member, its byte slice.

    Raises:
        AudioError: for an empty cell (``missing``).
    """
    spec = spec.strip()
    if spec in ("", "-"):
        raise AudioError("no audio given (the audio cell is empty or '-')", reason="missing")
    m = _ZIP_SPEC.match(spec)
    path, offset, length = (m["path"], int(m["offset"]), int(m["length"])) if m else (spec, None, None)
    path = os.path.expanduser(path)
    if not os.path.isabs(path):
        path = os.path.join(root, path)
    return AudioSpec(os.path.normpath(path), offset, length)


def _fail(spec: AudioSpec, problem: str, reason: str, where) -> AudioError:
    file, row = where if where is not None else (None, None)
    return AudioError(f"audio {spec}: {problem}", file=file, row=row, reason=reason)


def _read_source(spec: AudioSpec, where):
    """Check existence/size and return what soundfile should open (a path or a BytesIO) + the first bytes."""
    if not os.path.isfile(spec.path):
        what = "is a directory" if os.path.isdir(spec.path) else "not found"
        raise _fail(spec, f"file {what}; paths are absolute or relative to the manifest's folder (or to "
                          "task.audio_root when it is set)", "missing", where)
    size = os.path.getsize(spec.path)
    if spec.offset is None:
        if size == 0:
            raise _fail(spec, "file is empty (0 bytes)", "empty", where)
        with open(spec.path, "rb") as f:
            return spec.path, f.read(16)
    if spec.length == 0:
        raise _fail(spec, "zip slice is empty (length 0)", "empty", where)
    if spec.offset + spec.length > size:
        raise _fail(spec, f"zip slice ends at byte {spec.offset + spec.length} but the file has {size} bytes; "
                          "the offset:length is wrong or the zip is truncated", "corrupt", where)
    with open(spec.path, "rb") as f:
        f.seek(spec.offset)
        data = f.read(spec.length)
    return io.BytesIO(data), data[:16]


def _classify_open_error(spec: AudioSpec, head: bytes, err: Exception, where) -> AudioError:
    ext = os.path.splitext(spec.path)[1].lower() if spec.offset is None else ""
    if head[:len(_NPY_MAGIC)] == _NPY_MAGIC or ext == ".npy":
        return _fail(spec, _FEATURES_PROBLEM, "unsupported", where)
    for off, magic, name in _UNSUPPORTED_MAGIC:
        if head[off: off + len(magic)] == magic:
            return _fail(spec, f"{name} data cannot be decoded (supported: {_supported()}); convert it to wav/flac",
                         "unsupported", where)
    if ext in _UNSUPPORTED_EXT:
        return _fail(spec, f"'{ext}' files cannot be decoded (supported: {_supported()}); convert it to wav/flac",
                     "unsupported", where)
    detail = re.sub(r"^Error opening .*?: ", "", str(err))
    return _fail(spec, f"cannot be decoded ({detail}); the file is damaged or not audio", "corrupt", where)


@functools.lru_cache(maxsize=1)
def _supported() -> str:
    return ", ".join(sorted(k.lower() for k in ("WAV", "FLAC", "OGG", "MP3", "AIFF") if k in sf.available_formats()))


def _check_header(spec: AudioSpec, f: sf.SoundFile, where) -> None:
    for declared, actual in _SHORT_CHUNK.findall(f.extra_info):
        if int(declared) > int(actual) and int(declared) not in _STREAMING_SIZES:
            raise _fail(spec, f"truncated: the header declares {declared} bytes of audio data but the file holds "
                              f"{actual}; re-export or remove the file", "corrupt", where)
    if f.samplerate <= 0 or f.channels <= 0:
        raise _fail(spec, f"invalid header (sample rate {f.samplerate}, channels {f.channels})", "corrupt", where)
    if f.frames == 0:
        raise _fail(spec, "holds 0 samples", "zero_length", where)


def _too_long(spec, n16: int, max_seconds, where) -> None:
    if max_seconds is not None and n16 > max_seconds * SAMPLE_RATE:
        raise _fail(spec, f"is {n16 / SAMPLE_RATE:.2f} s long, over the maximum of {max_seconds:g} s "
                          "(task.max_audio_seconds); trim it or raise the limit", "too_long", where)


def _open(spec: str, root: str, where) -> Tuple[AudioSpec, sf.SoundFile]:
    """Resolve, check and open an audio cell; the header is validated (truncation, 0 samples)."""
    s = parse_audio_spec(spec, root)
    src, head = _read_source(s, where)
    try:
        f = sf.SoundFile(src)
    except (sf.SoundFileError, RuntimeError) as e:
        raise _classify_open_error(s, head, e, where) from None
    try:
        _check_header(s, f, where)
    except AudioError:
        f.close()
        raise
    return s, f


def _segment_frames(spec: AudioSpec, f: sf.SoundFile, segment: Optional[Tuple[int, int]], where) -> int:
    """The samples to read from the open ``f`` (at its own rate): all of them, or the segment's after seeking to it."""
    if segment is None:
        return f.frames
    start, end = segment
    if end > f.frames:
        raise _fail(spec, f"the segment [start_frame, end_frame) = [{start}, {end}) ends after the file's {f.frames} "
                          f"samples (at {f.samplerate} Hz); both count the file's own samples", "segment", where)
    f.seek(start)
    return end - start


def audio_num_frames(spec: str, root: str = "", *, max_seconds: Optional[float] = None,
                     where: Optional[Tuple[str, int]] = None, segment: Optional[Tuple[int, int]] = None) -> int:
    """Number of 16 kHz samples ``load_audio`` returns, from the header only (no decoding).

    Damage in the middle of a compressed stream and silence are only found by ``load_audio``. MP3
    headers can carry an estimated length, so MP3s are decoded to count.

    Args:
        spec (str): the audio cell.
        root (str): the folder relative paths start from.
        max_seconds (Optional[float]): longer audio is an error (``too_long``).
        where (Optional[Tuple[str, int]]): (manifest file, line) to put in front of error messages.
        segment (Optional[Tuple[int, int]]): read only the file's samples ``[start, end)`` (at its own rate).

    Returns:
        int: 16 kHz samples.

    Raises:
        AudioError: for missing, empty, unsupported, corrupt-header, zero-length or too-long audio.
    """
    s, f = _open(spec, root, where)
    with f:
        n16, inexact = num_frames_16k(_segment_frames(s, f, segment, where), f.samplerate), f.format in _INEXACT_LENGTH
    _too_long(s, n16, max_seconds, where)
    if inexact:
        return len(load_audio(spec, root, max_seconds=max_seconds, where=where, segment=segment))
    return n16


def load_audio(spec: str, root: str = "", *, max_seconds: Optional[float] = None,
               where: Optional[Tuple[str, int]] = None, segment: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Decode an audio cell to 16 kHz mono float32 (see the module docstring for every error reason).

    Args:
        spec (str): the audio cell.
        root (str): the folder relative paths start from (the manifest's folder).
        max_seconds (Optional[float]): longer audio is an error (``too_long``).
        where (Optional[Tuple[str, int]]): (manifest file, line) to put in front of error messages.
        segment (Optional[Tuple[int, int]]): read only the file's samples ``[start, end)`` (at its own rate).

    Returns:
        np.ndarray: the waveform with shape (T,).

    Raises:
        AudioError: naming the file, with its ``reason``.
    """
    s, f = _open(spec, root, where)
    with f:
        sr, declared, exact = f.samplerate, _segment_frames(s, f, segment, where), f.format not in _INEXACT_LENGTH
        _too_long(s, num_frames_16k(declared, sr), max_seconds, where)
        try:
            wav = f.read(declared if segment is not None else -1, dtype="float32", always_2d=True)  # (T, C)
        except (sf.SoundFileError, RuntimeError) as e:
            raise _fail(s, f"decoding failed after the header ({e}); the file is damaged", "corrupt", where) from None
    if len(wav) != declared and exact:
        raise _fail(s, f"the header declares {declared} samples but {len(wav)} decode; the file is damaged",
                    "corrupt", where)
    if len(wav) == 0:
        raise _fail(s, "holds 0 samples", "zero_length", where)
    if not np.isfinite(wav).all():
        raise _fail(s, "contains NaN or infinite samples", "corrupt", where)
    wav = resample_to_16k(wav, sr)  # (T, C) -> (T16,)
    _too_long(s, len(wav), max_seconds, where)
    peak = float(np.abs(wav).max())
    if peak < SILENCE_PEAK:
        loc = f"{where[0]}:{where[1]}: " if where is not None else ""
        logger.warning(f"{loc}audio {s} is silent (peak |x| = {peak:.1e} < {SILENCE_PEAK:g}); decoding it as it is")
    return wav

