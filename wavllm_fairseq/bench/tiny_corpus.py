"""A tiny instruction corpus written from scratch for the GPU check's CLI section: short tone wavs, ASR
manifests (train / valid / test) and text-only instruction manifests, a sentencepiece tokenizer trained on
their text, and a random LLaMA folder of ``wavllm_tiny``'s LLM size. Nothing is downloaded; every draw is
seeded.
"""
import os
from typing import Dict, List

import numpy as np
import soundfile as sf
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ..data.manifest import escape_cell
from ..data.prompt_template import DEFAULT_SYSTEM_PROMPT
from ..data.tokenizer import train_sentencepiece
from ..models.architectures import ARCHITECTURES

COLUMNS = ("id", "audio", "n_frames", "prompt", "tgt_text", "with_speech", "task")
WORDS = ("red", "blue", "cat", "dog", "runs", "sleeps", "the", "a", "big", "small", "house", "tree")
TEMPLATE_TEXT = "[INST] <<SYS>> <</SYS>> <SPEECH> </SPEECH> [/INST]"  # the template's pieces, for the tokenizer
INIT_RANGE = 0.2  # wide enough that a frozen random LM head can still express peaked answers through LoRA


def _write_manifest(path: str, rows: List[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(COLUMNS) + "\n")
        for r in rows:
            f.write("\t".join(escape_cell(str(r[c])) for c in COLUMNS) + "\n")
    return path


def _asr_rows(root: str, prefix: str, n: int, offset: int, rng: np.random.Generator) -> List[dict]:
    """``n`` rows of 0.6-1.2 s noisy tones (the pitch varies by row) answered by three random words."""
    rows = []
    for i in range(n):
        t = np.arange(int((0.6 + 0.15 * ((i + offset) % 5)) * 16000)) / 16000
        wav = 0.3 * np.sin(2 * np.pi * (200 + 40 * (i % 7)) * t) + 0.02 * rng.standard_normal(len(t))
        name = f"wav/{prefix}{i}.wav"
        sf.write(os.path.join(root, name), wav.astype(np.float32), 16000, subtype="PCM_16")
        rows.append(dict(id=f"{prefix}{i}", audio=name, n_frames=len(t), prompt="What is said?",
                         tgt_text=" ".join(rng.choice(WORDS, size=3)), with_speech="True", task="asr"))
    return rows


def _it_rows(prefix: str, n: int) -> List[dict]:
    """``n`` text-only rows: "Repeat the word W twice." answered by "W W"."""
    words = [WORDS[i % len(WORDS)] for i in range(n)]
    return [dict(id=f"{prefix}{i}", audio="", n_frames=0, prompt=f"Repeat the word {w} twice.", tgt_text=f"{w} {w}",
                 with_speech="False", task="it") for i, w in enumerate(words)]


def save_tiny_llama(out: str, vocab: int, seed: int = 0) -> str:
    """A random LLaMA of ``wavllm_tiny``'s LLM sizes, saved with ``save_pretrained``.

    Args:
        out (str): the folder to write
        vocab (int): its vocabulary size (the tokenizer's)
        seed (int): seed of its weights

    Returns:
        str: ``out``
    """
    arch = ARCHITECTURES["wavllm_tiny"]
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=arch["llama_dim"], num_hidden_layers=arch["llama_layers"],
                      num_attention_heads=arch["llama_heads"], num_key_value_heads=arch["llama_kv_heads"],
                      intermediate_size=arch["llama_ffn_dim"], vocab_size=vocab,
                      max_position_embeddings=arch["llama_max_positions"], bos_token_id=1, eos_token_id=2,
                      pad_token_id=None, tie_word_embeddings=False, initializer_range=INIT_RANGE)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def write_tiny_corpus(root: str, n_train: int = 16, n_test: int = 4, seed: int = 0,
                      vocab_size: int = 320) -> Dict[str, str]:
    """Write the corpus under ``root``: ``wav/``, the manifests, ``tok/`` and ``llama/``.

    Args:
        root (str): the folder to write (the manifests' audio paths are relative to it)
        n_train (int): rows of each training manifest
        n_test (int): rows of each valid / test manifest
        seed (int): seed of the audio, the answers and the LLaMA's weights
        vocab_size (int): the tokenizer's target vocabulary size

    Returns:
        Dict[str, str]: the paths of the manifests ``train_asr``, ``train_it``, ``valid_asr``, ``test_asr``,
        ``test_it``, of the tokenizer folder ``tok`` and of the LLaMA folder ``llama``
    """
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "wav"), exist_ok=True)
    rows = {"train_asr": _asr_rows(root, "tr", n_train, 0, rng), "train_it": _it_rows("it", n_train),
            "valid_asr": _asr_rows(root, "va", n_test, 100, rng), "test_asr": _asr_rows(root, "te", n_test, 200, rng),
            "test_it": _it_rows("ti", n_test)}
    paths = {name: _write_manifest(os.path.join(root, f"{name}.tsv"), r) for name, r in rows.items()}
    texts = [f"{r['prompt']} {r['tgt_text']}" for part in rows.values() for r in part]
    tok = train_sentencepiece((texts + [DEFAULT_SYSTEM_PROMPT, TEMPLATE_TEXT]) * 5, os.path.join(root, "tok"),
                              vocab_size=vocab_size)
    paths["tok"] = os.path.join(root, "tok")
    paths["llama"] = save_tiny_llama(os.path.join(root, "llama"), len(tok), seed)
    return paths
