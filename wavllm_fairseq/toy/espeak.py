"""espeak-ng in process, through its C library: waveform plus the start sample of every word.

The ``espeak-ng`` command writes the same samples (it is a thin front end over ``libespeak-ng``), but
only the library reports *where* each word starts (``espeakEVENT_WORD`` events). The toy corpus keeps
those word boundaries as alignments, which the Whisper stand-in of stage 0 trains on, and synthesis in
process avoids one subprocess and one temporary file per clip.

    synth = Espeak()                       # one per process (the library keeps global state)
    wav, sr, starts = synth("the red cat", voice="en-us+f1", pitch=50, speed=165, amplitude=100)
    # wav: int16 samples at sr (22050 Hz); starts: sample index where each word begins

Parameters are the command's ``-v``, ``-p``, ``-s`` and ``-a`` (tested equal sample for sample).
"""
import ctypes
import ctypes.util
import os
import pickle
from typing import List, Optional, Tuple

import numpy as np

# espeak_AUDIO_OUTPUT, espeak_EVENT_TYPE, espeak_PARAMETER, espeak_POSITION_TYPE (speak_lib.h)
AUDIO_OUTPUT_SYNCHRONOUS = 2
EVENT_LIST_TERMINATED, EVENT_WORD = 0, 1
PARAM_RATE, PARAM_VOLUME, PARAM_PITCH = 1, 2, 3
POS_CHARACTER = 1
SYNTH_FLAGS = 0x1000 | 0x100  # espeakENDPAUSE | espeakPHONEMES, as the command synthesizes
LIBRARY_NAMES = ("libespeak-ng.so.1", "libespeak-ng.so")


class _Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


class _Voice(ctypes.Structure):  # espeak_VOICE
    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_char_p), ("identifier", ctypes.c_char_p),
                ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte),
                ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int), ("spare", ctypes.c_void_p)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


class EspeakError(RuntimeError):
    pass


def _load_library() -> ctypes.CDLL:
    names = list(LIBRARY_NAMES)
    found = ctypes.util.find_library("espeak-ng")
    if found:
        names.append(found)
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise EspeakError("libespeak-ng not found: install espeak-ng (Debian: apt-get install espeak-ng, which brings "
                      "libespeak-ng1) or run examples/wavllm/scripts/install.sh")


class Espeak:
    """The espeak-ng synthesizer of this process (the C library is a process-wide singleton)."""

    _lib: Optional[ctypes.CDLL] = None
    sample_rate: int = 0

    def __init__(self):
        cls = type(self)
        if cls._lib is None:
            lib = _load_library()
            rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, None, 0)
            if rate <= 0:
                raise EspeakError(f"espeak_Initialize failed ({rate}): is espeak-ng-data installed?")
            cls._lib, cls.sample_rate = lib, rate
        self._chunks: List[np.ndarray] = []
        self._words: List[Tuple[int, int]] = []
        self._callback = _CALLBACK(self._collect)  # kept referenced while the library may call it

    def _collect(self, wav, n, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != EVENT_LIST_TERMINATED:
            if events[i].type == EVENT_WORD:
                self._words.append((int(events[i].text_position), int(events[i].sample)))
            i += 1
        return 0

    def __call__(self, text: str, voice: str, pitch: int, speed: int,
                 amplitude: int) -> Tuple[np.ndarray, int, List[int]]:
        """Synthesize ``text`` in this process (the library's state carries over from call to call).

        Args:
            text (str): the words.
            voice (str): an espeak-ng voice, ``accent+variant`` (``en-us+f1``).
            pitch (int): 0-99, as the command's ``-p``.
            speed (int): words per minute, as ``-s``.
            amplitude (int): 0-200, as ``-a``.

        Returns:
            Tuple[np.ndarray, int, List[int]]: (int16 waveform (T,), sample rate, start sample of each word).
        """
        lib = self._lib
        lib.espeak_SetSynthCallback(self._callback)
        # as the command does: a voice name (or file), else a language ("en-gb+f1")
        if lib.espeak_SetVoiceByName(voice.encode()) != 0 and lib.espeak_SetVoiceByProperties(
                ctypes.byref(_Voice(languages=voice.encode()))) != 0:
            raise EspeakError(f"espeak-ng has no voice {voice!r} (espeak-ng --voices lists them)")
        for param, value in ((PARAM_RATE, speed), (PARAM_PITCH, pitch), (PARAM_VOLUME, amplitude)):
            lib.espeak_SetParameter(param, int(value), 0)
        self._chunks, self._words = [], []
        data = text.encode() + b"\0"
        status = lib.espeak_Synth(data, len(data), 0, POS_CHARACTER, 0, SYNTH_FLAGS, None, None)
        lib.espeak_Synchronize()
        if status != 0 or not self._chunks:
            raise EspeakError(f"espeak-ng synthesis failed ({status}) for {text!r} with voice {voice}")
        wav = np.concatenate(self._chunks)
        return wav, self.sample_rate, word_starts(text, self._words, len(wav))


def word_starts(text: str, events: List[Tuple[int, int]], n_samples: int) -> List[int]:
    """Start sample of every whitespace-separated word of ``text`` from espeak's word events.

    espeak reports (1-based character position, start sample) per word it speaks as a unit; an
    unstressed word it joins to its neighbour ("in the" in some accents) gets no event of its own, and
    its start is placed by character share between the neighbouring events.

    Args:
        text (str): the synthesized text.
        events (List[Tuple[int, int]]): (1-based character position, start sample) of espeak's word events.
        n_samples (int): the waveform's length (where the last word's span ends).

    Returns:
        List[int]: one start sample per word.
    """
    chars, pos = [], 0
    for w in text.split(" "):
        if w:
            chars.append(pos + 1)
        pos += len(w) + 1
    at = {c: s for c, s in events}
    known = [(i, at[c]) for i, c in enumerate(chars) if c in at]
    if not known:
        raise EspeakError(f"espeak-ng reported no word positions for {text!r}")
    if known[0][0] != 0:
        known.insert(0, (0, 0))
    starts: List[int] = []
    for k, (i, s) in enumerate(known):
        j, e = known[k + 1] if k + 1 < len(known) else (len(chars), n_samples)
        span_chars = (chars[j] if j < len(chars) else pos + 1) - chars[i]
        for m in range(i, j):
            starts.append(int(s + (e - s) * (chars[m] - chars[i]) / max(1, span_chars)))
    return starts


def synthesize(text: str, voice: str, pitch: int, speed: int, amplitude: int) -> Tuple[np.ndarray, int, List[int]]:
    """Like ``Espeak()(...)`` but in a forked child with a fresh library, so the result depends on the
    arguments only (the library carries state from one utterance to the next, e.g. its pitch flutter;
    a fresh one gives exactly the ``espeak-ng`` command's samples).

    Args:
        text, voice, pitch, speed, amplitude: as ``Espeak.__call__``'s.

    Returns:
        Tuple[np.ndarray, int, List[int]]: (int16 waveform (T,), sample rate, start sample of each word).
    """
    if Espeak._lib is not None:
        raise EspeakError("synthesize() needs a process that has not initialised espeak itself")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: synthesize, send the result, exit without running the parent's cleanup
        code = 0
        try:
            os.close(read_fd)
            try:
                payload = ("ok", Espeak()(text, voice, pitch, speed, amplitude))
            except Exception as e:  # reported by the parent
                payload = ("error", f"{type(e).__name__}: {e}")
            data = pickle.dumps(payload)
            with os.fdopen(write_fd, "wb") as f:
                f.write(data)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data or status != 0:
        raise EspeakError(f"espeak-ng child process failed (status {status}) for {text!r} with voice {voice}")
    kind, value = pickle.loads(data)
    if kind != "ok":
        raise EspeakError(value)
    return value
