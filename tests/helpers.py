"""A tiny instruction corpus for tests: a few short wavs, manifests for several tasks, a tokenizer."""
import importlib.util
import os
import shutil
from typing import Dict, List, NoReturn

import numpy as np
import pytest
import soundfile as sf

from wavllm_fairseq.data.prompt_template import DEFAULT_SYSTEM_PROMPT
from wavllm_fairseq.data.tokenizer import train_sentencepiece

HEADER = ["id", "audio", "n_frames", "prompt", "tgt_text", "with_speech"]
WORDS = ["red", "blue", "cat", "dog", "runs", "sleeps", "the", "a", "big", "small", "house", "tree"]


def tone(seconds: float, freq: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


def write_manifest(path: str, rows: List[Dict[str, str]], extra: List[str] = ()) -> str:
    cols = HEADER + list(extra)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(cols) + "\n")
        for r in rows:
            f.write("\t".join(str(r.get(c, "")) for c in cols) + "\n")
    return path


def make_corpus(root: str, n_train: int = 8, n_test: int = 4, seed: int = 0, vocab_size: int = 320) -> Dict[str, str]:
    """Writes root/wav/*.wav, train_asr / train_it / valid_asr / test_asr / test_it manifests, root/tok.

    ASR answers are word sequences (distinct tones per row); IT rows are text-only.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "wav"), exist_ok=True)
    texts = []

    def asr_rows(prefix: str, n: int, offset: int):
        rows = []
        for i in range(n):
            words = " ".join(rng.choice(WORDS, size=3))
            secs = 0.6 + 0.15 * ((i + offset) % 5)
            wav = tone(secs, 200 + 40 * (i % 7), seed + i + offset)
            name = f"wav/{prefix}{i}.wav"
            sf.write(os.path.join(root, name), wav, 16000, subtype="PCM_16")
            rows.append(dict(id=f"{prefix}{i}", audio=name, n_frames=len(wav), prompt="What is said?",
                             tgt_text=words, with_speech="True", task="asr"))
            texts.append(words)
        return rows

    def it_rows(prefix: str, n: int):
        rows = []
        for i in range(n):
            w = WORDS[i % len(WORDS)]
            rows.append(dict(id=f"{prefix}{i}", audio="", n_frames=0, prompt=f"Repeat the word {w} twice.",
                             tgt_text=f"{w} {w}", with_speech="False", task="it"))
            texts.append(f"Repeat the word {w} twice. {w} {w}")
        return rows

    paths = {
        "train_asr": write_manifest(os.path.join(root, "train_asr.tsv"), asr_rows("tr", n_train, 0), ["task"]),
        "train_it": write_manifest(os.path.join(root, "train_it.tsv"), it_rows("it", n_train), ["task"]),
        "valid_asr": write_manifest(os.path.join(root, "valid_asr.tsv"), asr_rows("va", n_test, 100), ["task"]),
        "test_asr": write_manifest(os.path.join(root, "test_asr.tsv"), asr_rows("te", n_test, 200), ["task"]),
        "test_it": write_manifest(os.path.join(root, "test_it.tsv"), it_rows("ti", n_test), ["task"]),
    }
    texts += ["What is said?", DEFAULT_SYSTEM_PROMPT, "[INST] <<SYS>> <</SYS>> <SPEECH> </SPEECH> [/INST]"]
    tok = train_sentencepiece(texts * 5, os.path.join(root, "tok"), vocab_size=vocab_size)
    paths["tok"] = os.path.join(root, "tok")
    paths["llama"] = save_tiny_llama(os.path.join(root, "llama"), len(tok), seed)
    return paths


def save_tiny_llama(out: str, vocab: int, seed: int = 0, dim: int = 64) -> str:
    """A wavllm_tiny-sized LLaMA saved with save_pretrained (initialised wide enough that a frozen
    random LM head can still express peaked distributions through LoRA/adapters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=dim, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=2 * dim, vocab_size=vocab, max_position_embeddings=1024, bos_token_id=1,
                      eos_token_id=2, pad_token_id=None, tie_word_embeddings=False, initializer_range=0.2)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


# ------------------------------------------------------------------ what install.sh installs
def in_ci() -> bool:
    """Whether the tests run under CI (``CI`` set, and not to ``false`` or ``0``; CI services set ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def not_installed(what: str) -> NoReturn:
    """Skip the calling test for lack of ``what``, which examples/wavllm/scripts/install.sh installs; under CI
    fail it instead (a CI run that skips it tests less than it claims)."""
    message = f"{what} is not installed (examples/wavllm/scripts/install.sh installs it)"
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def require_installed(*modules: str) -> None:
    """``not_installed`` unless every module can be found (found, not imported: a package's ``__init__``
    may need what install.sh leaves out on purpose)."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            not_installed(f"the Python package {module}")


def require_program(*names: str) -> str:
    """The path of the first of ``names`` on PATH; ``not_installed`` when there is none."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    not_installed(" / ".join(names))
