"""flite voices for the corpus of the real small recipe: speech the real Whisper tiny.en hears.

flite (Debian package ``flite``) ships three voices Whisper tiny.en transcribes well: ``slt`` (female),
``rms`` and ``awb`` (male). One voice becomes many speakers by a vocal-tract warp: resampling by a factor
``warp`` and playing back at 16 kHz scales pitch, formants and tempo together, the way a shorter or longer
vocal tract does; ``slt`` also takes a mean pitch (``int_f0_target_mean``; ``rms`` and ``awb`` ignore it).
A speaker is (voice, warp, pitch); the training and test speakers are disjoint (test warps and pitches
lie between the training ones, data/voices.json ``flite``). A speaking style moves tempo
(``duration_stretch``), pitch range (``int_f0_target_stddev``), pitch, loudness, spectral tilt and
saturation by more than the per-clip jitter, so it shows through every speaker's own voice.
"""
import os
import subprocess
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import soundfile as sf
from scipy.signal import lfilter, resample_poly

from .tables import FLITE

SAMPLE_RATE = 16000
# a speaker: (flite voice, vocal-tract warp, mean pitch in Hz or 0 for the voice's own)
Speaker = Tuple[str, float, float]


def speakers(split: str) -> List[Speaker]:
    """The flite speakers of a split.

    Args:
        split (str): ``train``, or ``test`` / ``valid`` (the held-out speakers).

    Returns:
        List[Speaker]: (voice, warp, pitch) of each speaker; pitch 0 keeps the voice's own.
    """
    table = FLITE["train" if split == "train" else "test"]
    out = []
    for voice, spec in table.items():
        for warp in spec["warps"]:
            for pitch in spec.get("pitches") or [0]:
                out.append((voice, float(warp), float(pitch)))
    return out


def gender(voice: str) -> str:
    """``female`` or ``male``: the flite voice's."""
    return FLITE["genders"][voice]


def speaker_name(spk: Speaker) -> str:
    """A speaker's id in the manifests' ``speaker`` column (``slt@w1.04@f200``)."""
    voice, warp, pitch = spk
    return f"{voice}@w{warp:.2f}" + (f"@f{pitch:.0f}" if pitch else "")


def style_settings(style: str, rng: np.random.Generator) -> Dict[str, float]:
    """One utterance's settings for a speaking style, jittered (tempo +-4 %, loudness +-10 %).

    Args:
        style (str): a key of data/voices.json ``flite.styles``.
        rng (np.random.Generator): the corpus's generator.

    Returns:
        Dict[str, float]: ``stretch``, ``pitch_scale``, ``range_scale``, ``gain``, ``tilt``, ``drive``.
    """
    s = dict(FLITE["styles"][style])
    s["stretch"] *= float(rng.uniform(0.96, 1.04))
    s["gain"] *= float(rng.uniform(0.9, 1.1))
    return s


def synthesize(text: str, spk: Speaker, settings: Dict[str, float]) -> np.ndarray:
    """One utterance: flite, the speaker's warp, the style's loudness, tilt and saturation; silence trimmed.

    Args:
        text (str): what is said.
        spk (Speaker): who says it.
        settings (Dict[str, float]): ``style_settings``.

    Returns:
        np.ndarray: float32 samples at 16 kHz, shape (T,), in [-1, 1].
    """
    voice, warp, pitch = spk
    flags = ["--setf", f"duration_stretch={settings['stretch'] * warp:.4f}"]  # the warp shortens by 1/warp
    if pitch:
        flags += ["--setf", f"int_f0_target_mean={pitch * settings['pitch_scale'] / warp:.1f}",
                  "--setf", f"int_f0_target_stddev={FLITE['f0_stddev'] * settings['range_scale']:.1f}"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "u.wav")
        subprocess.run(["flite", "-voice", voice, *flags, "-t", text, "-o", path], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wav, sr = sf.read(path, dtype="float32")
    if sr != SAMPLE_RATE:
        raise RuntimeError(f"flite voice {voice} wrote {sr} Hz, not {SAMPLE_RATE}: use a 16 kHz voice")
    if abs(warp - 1.0) > 1e-6:  # played back faster (warp > 1): higher pitch and formants, a shorter tract
        wav = resample_poly(wav, 1000, int(round(1000 * warp))).astype(np.float32)
    wav = _effects(wav, settings)
    nz = np.flatnonzero(np.abs(wav) > 1e-3)
    if len(nz):
        wav = wav[max(0, nz[0] - 800): nz[-1] + 800]
    return wav


def _effects(wav: np.ndarray, s: Dict[str, float]) -> np.ndarray:
    """Spectral tilt (first-order pre-emphasis > 0 brightens, < 0 darkens), saturation, loudness."""
    if s["tilt"] > 0:
        wav = lfilter([1.0, -s["tilt"]], [1.0], wav)
    elif s["tilt"] < 0:
        wav = lfilter([1.0 + s["tilt"]], [1.0, s["tilt"]], wav)  # one-pole low-pass, unit gain at 0 Hz
    peak = float(np.max(np.abs(wav))) or 1.0
    wav = wav / peak
    if s["drive"] > 1:
        wav = np.tanh(s["drive"] * wav) / np.tanh(s["drive"])
    return (s["gain"] * wav).astype(np.float32)


def synth_clip(job) -> Tuple[str, int, List[List[int]]]:
    """One clip (one utterance, or two joined by 0.3 s of silence) written as 16 kHz PCM16, and the
    [start, end) sample span of each utterance (stage 0's WavLM stand-in finds a second speaker from it).

    Args:
        job (Tuple[str, Sequence]): (wav path, [(text, speaker, settings)] per utterance).

    Returns:
        Tuple[str, int, List[List[int]]]: (the path, its samples, the utterance spans).
    """
    out_path, parts = job
    pieces, spans, offset = [], [], 0
    for k, (text, spk, settings) in enumerate(parts):
        if k:
            pieces.append(np.zeros(4800, dtype=np.float32))
            offset += 4800
        wav = synthesize(text, tuple(spk), settings)
        pieces.append(wav)
        spans.append([offset, offset + len(wav)])
        offset += len(wav)
    wav = np.clip(np.concatenate(pieces), -1, 1)
    sf.write(out_path, wav, SAMPLE_RATE, subtype="PCM_16")
    return out_path, len(wav), spans


def check_flite(voices: Optional[Sequence[str]] = None) -> Optional[str]:
    """None when flite runs with every voice the corpus uses, else what is wrong (to print)."""
    voices = voices or sorted(FLITE["genders"])
    try:
        out = subprocess.run(["flite", "-lv"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"flite does not run ({e}): install it (Debian: apt-get install flite) or run install.sh"
    missing = [v for v in voices if v not in out.split()]
    return f"flite lacks the voices {missing} (flite -lv: {out.strip()})" if missing else None
