#!/usr/bin/env python3
"""How close each resampler of data/resample.py comes to SoX's ``rate`` (what the reference runs through
torchaudio.sox_effects), on the waveform and on the real Whisper tiny.en encoder's outputs.

    python examples/wavllm/scripts/resampler_check.py CLIP.wav --whisper work_real/real_backbones/whisper-tiny.en

Needs the ``sox`` program (Debian: apt-get install sox). Prints, for soxr and poly against ``sox ... rate 16k``
(SoX's default quality, as torchaudio's ``rate 16000``), the output lengths, the waveform's max and RMS
difference, and the max and mean absolute difference of the encoder outputs (with the outputs' RMS).
"""
import argparse
import os
import subprocess
import tempfile

import numpy as np
import soundfile as sf
import torch

from wavllm_fairseq.data.resample import RESAMPLERS, resample_to_16k
from wavllm_fairseq.models.encoders import WhisperSemanticEncoder, load_whisper_encoder


def sox_rate(path: str) -> np.ndarray:
    """``sox CLIP -r 16000 -c 1 -b 32 -e floating-point OUT.wav rate`` (SoX's default: high quality)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "o.wav")
        subprocess.run(["sox", path, "-c", "1", "-b", "32", "-e", "floating-point", out, "rate", "16000"],
                       check=True, capture_output=True)
        return sf.read(out, dtype="float32")[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("clip")
    p.add_argument("--whisper", required=True, help="a Whisper HF folder (wavllm-prepare-small-backbones)")
    args = p.parse_args()
    wav, sr = sf.read(args.clip, dtype="float32", always_2d=True)
    wav = wav.mean(axis=1)
    ref = sox_rate(args.clip)
    enc = WhisperSemanticEncoder(load_whisper_encoder(args.whisper)).eval()

    def encode(x: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            t = torch.from_numpy(np.ascontiguousarray(x))[None]
            return enc(t, torch.tensor([t.shape[1]]))[0][0]

    e_ref = encode(ref)
    print(f"clip {args.clip}: {sr} Hz, {len(wav)} samples; sox rate: {len(ref)} samples; "
          f"encoder output RMS {e_ref.pow(2).mean().sqrt():.4f}")
    for method in RESAMPLERS:
        y = resample_to_16k(wav, sr, method)
        n = min(len(y), len(ref))
        d = y[:n] - ref[:n]
        e = encode(y)
        m = min(e.shape[0], e_ref.shape[0])
        de = (e[:m] - e_ref[:m]).abs()
        print(f"{method}: {len(y)} samples (sox {len(ref)}); waveform max |diff| {np.abs(d).max():.2e}, "
              f"RMS diff {np.sqrt((d ** 2).mean()):.2e}; encoder frames {e.shape[0]} vs {e_ref.shape[0]}, "
              f"max |diff| {de.max():.3e}, mean |diff| {de.mean():.3e}")


if __name__ == "__main__":
    main()
