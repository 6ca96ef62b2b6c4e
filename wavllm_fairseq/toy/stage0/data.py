"""What the stage-0 stand-ins read from the toy corpus: manifest rows, their audio, padded batches, where
the second utterance of a two-utterance clip starts."""
import json
import os
from typing import List, Sequence, Tuple

import numpy as np
import torch

from ...data.audio import load_audio
from ...data.manifest import ManifestRow, read_manifest


def train_manifests(corpus: str) -> List[str]:
    """The names (without ``.tsv``) of the training manifests the corpus tool wrote, sorted: the ``train_*.tsv``
    of the folder that ``corpus.json``'s ``counts`` lists (all of them where it lists none), so a manifest
    derived later beside them (the pipeline's ``train_sqqa_llm.tsv``) is neither read nor in the cache key.

    Args:
        corpus (str): the toy corpus folder.

    Returns:
        List[str]: e.g. ``["train_asr", "train_er", ...]``.
    """
    try:
        with open(os.path.join(corpus, "corpus.json")) as f:
            counts = json.load(f).get("counts")
    except (OSError, ValueError, AttributeError):
        counts = None
    names = [n[:-4] for n in sorted(os.listdir(corpus)) if n.startswith("train_") and n.endswith(".tsv")]
    return [n for n in names if n in counts] if isinstance(counts, dict) else names


def rows(corpus: str, name: str) -> List[ManifestRow]:
    """The rows of the corpus's ``<name>.tsv``.

    Args:
        corpus (str): the toy corpus folder.
        name (str): the manifest's name without ``.tsv`` (``train_asr``).

    Returns:
        List[ManifestRow]: its rows.
    """
    out, _ = read_manifest(os.path.join(corpus, name + ".tsv"))
    return out


def audio(corpus: str, items: Sequence[ManifestRow]) -> List[np.ndarray]:
    """The 16 kHz waveforms of rows.

    Args:
        corpus (str): the folder their audio paths are relative to.
        items (Sequence[ManifestRow]): the rows.

    Returns:
        List[np.ndarray]: one float32 waveform of shape (T_i,) per row.
    """
    return [load_audio(r.audio, corpus) for r in items]


def batch_wav(wavs: Sequence[np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Waveforms as one zero-padded batch.

    Args:
        wavs (Sequence[np.ndarray]): B waveforms of shape (T_i,).

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: the batch (B, max T_i) and the lengths (B,).
    """
    lengths = torch.tensor([len(w) for w in wavs])
    out = torch.zeros(len(wavs), int(lengths.max()))
    for i, w in enumerate(wavs):
        out[i, : len(w)] = torch.from_numpy(w)
    return out, lengths


def second_utterance(spans: Sequence[Sequence[int]], where: str = "a two-utterance clip") -> int:
    """Index of the first word after the widest pause between words (where an SV clip's second
    utterance starts).

    Args:
        spans (Sequence[Sequence[int]]): [start, end) sample span of each word (``word_samples``).
        where (str): names the clip in the error.

    Returns:
        int: index into ``spans`` of the second utterance's first word.
    """
    if len(spans) < 2:
        raise ValueError(f"{where}: an SV clip needs at least two word alignments (word_samples); "
                         "regenerate the corpus")
    return max(range(1, len(spans)), key=lambda i: spans[i][0] - spans[i - 1][1])
