"""Toy stage 0: pretrain tiny stand-ins for Whisper, WavLM and LLaMA on the toy corpus.

    wavllm-toy-pretrain --corpus manifests/toy --out work_toy/backbones [--size default|small] [--seed 1]

The paper starts from pretrained Whisper-large-v2, WavLM-base and LLaMA-2-7B-chat, which cannot be
downloaded here. This step makes small ``transformers`` models that play their roles and saves each with
``save_pretrained`` to ``OUT/{whisper,wavlm,llama}``; stages 1 and 2 load them through the same config
fields as the real weights (``model.whisper_path`` ...) and keep them frozen.

* Whisper stand-in (``WhisperEncoder``): a CTC objective on the transcripts (word units) over the same
  log-mel input and windowing the plugin uses (``encoders.WhisperSemanticEncoder``), plus frame-level
  cross entropy on the word alignment the synthesizer reported (manifest column ``word_samples``), which
  speeds up its learning over CTC alone (examples/wavllm/toy/RESULTS.md); its frames carry the content,
  as Whisper's do.
* WavLM stand-in (``WavLMModel``, per-frame LayerNorm feature extractor): speaker, gender and
  speaking-style classification of training clips and same/different speaker of two-utterance training
  clips (its frames then carry who speaks, whether the speaker changes, and how, as WavLM's do).
* LLaMA stand-in (``LlamaForCausalLM``) and its sentencepiece ``tokenizer.model``: a language model on
  the chat-formatted training prompts and answers (text only), standing in for the chat LLM.

The result is cached: ``OUT/stage0.json`` records a key of the corpus, the settings and the source of
stage 0 (its modules, the toy tables and prompt pools it reads, the plugin modules that build its inputs
and models); a second run with the same key does nothing. Each model reports a held-out check (CTC WER,
style/gender/SV accuracy, perplexity, in-context reading).
"""
import argparse
import glob
import hashlib
import json
import os
import time
from typing import List, Optional, Sequence

import torch

from ...data import audio, manifest, prompt_template, tokenizer
from ...data.tokenizer import train_sentencepiece
from ...models import encoders, frontend
from .. import tables
from .data import second_utterance, train_manifests  # noqa: F401  (this package's names, as other modules and tests import them)
from .llama import (SECOND_SPEAKER_TAG, SPAN_REPEATS, TAG_SCALE, embed_with_tags, lm_sequences,  # noqa: F401
                    text_span, tokenizer_texts, train_llama, word_tags)
from .loop import log
from .wavlm import speaker_change_labels, train_wavlm, wavlm_config  # noqa: F401
from .whisper import train_whisper, word_frame_labels  # noqa: F401

# fixed settings per size: model sizes and optimisation steps (deterministic for a seed)
SETTINGS = {
    "default": dict(
        vocab=1000,
        whisper=dict(unit="word", d_model=192, layers=3, heads=4, ffn=768, window_positions=200, steps=600, batch=16,
                     lr=3e-3, align_weight=1.0),
        wavlm=dict(hidden=144, layers=3, heads=4, ffn=576, conv_dim=48, steps=400, batch=8, sv_batch=6, lr=1.5e-3),
        llama=dict(dim=256, layers=4, heads=4, ffn=688, steps=700, batch=24, lr=2e-3),
    ),
    "small": dict(
        vocab=600,
        whisper=dict(unit="word", d_model=96, layers=2, heads=2, ffn=256, window_positions=200, steps=60, batch=8,
                     lr=2e-3, align_weight=1.0),
        wavlm=dict(hidden=64, layers=2, heads=2, ffn=128, conv_dim=32, steps=30, batch=8, sv_batch=2, lr=2e-3),
        llama=dict(dim=96, layers=2, heads=2, ffn=192, steps=60, batch=16, lr=3e-3),
    ),
}
BACKBONES = ("whisper", "wavlm", "llama")
# what stage 0 reads of the corpus besides the training manifests
CORPUS_FILES = ("lm_text.txt", "valid_asr.tsv", "valid_er.tsv", "valid_gender.tsv", "valid_sv.tsv")


# ------------------------------------------------------------------ cache key
def code_files() -> List[str]:
    """The files whose bytes define what stage 0 trains: its own modules; the toy tables it draws the
    LLaMA stand-in's extra sentences and prompts from (the grammar, the seen prompt pools); and the
    plugin modules that build its inputs and models (audio and log-mel features, the Whisper windowing,
    the manifest reader, the chat template, the tokenizer trainer).

    Returns:
        List[str]: the files' paths.
    """
    own = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "*.py")))
    toy = [tables.__file__, os.path.join(tables.DATA_DIR, "lexicon.json")]
    prompts = [os.path.join(tables.PROMPT_DIR, f"{task}.seen.txt") for task in tables.SPEECH_TASKS]
    plugin = [m.__file__ for m in (audio, frontend, encoders, manifest, prompt_template, tokenizer)]
    return own + toy + prompts + plugin


def code_digest(files: Sequence[str]) -> str:
    """sha1 of the files' bytes, each under its path relative to ``tables.SOURCE_ROOT`` (so the key does
    not depend on where the checkout or the installed package is).

    Args:
        files (Sequence[str]): the files (``code_files()``).

    Returns:
        str: the hex digest.
    """
    h = hashlib.sha1()
    for path in files:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"stage 0 reads {path}, which is missing") from None
        name = os.path.relpath(os.path.abspath(path), tables.SOURCE_ROOT).replace(os.sep, "/")
        h.update(f"{name}\0{len(data)}\0".encode() + data)
    return h.hexdigest()


def fingerprint(corpus: str, size: str, seed: int, files: Optional[Sequence[str]] = None,
                only: Sequence[str] = BACKBONES) -> str:
    """Key of a stage-0 result: the settings and seed, the source of stage 0 and every corpus file it
    reads (the training manifests of ``data.train_manifests``, held-out checks, the LM text): a manifest derived
    later beside them (the pipeline's ``train_sqqa_llm.tsv``) does not retrain stage 0.

    Args:
        corpus (str): the toy corpus folder.
        size (str): a key of ``SETTINGS``.
        seed (int): the stage-0 seed.
        files (Optional[Sequence[str]]): the source files (default: ``code_files()``).
        only (Sequence[str]): the stand-ins trained (all three: the key of every earlier result).

    Returns:
        str: 16 hex digits.
    """
    code = code_digest(code_files() if files is None else files)
    key = [size, seed, SETTINGS[size], code] + ([] if tuple(only) == BACKBONES else [sorted(only)])
    h = hashlib.sha1(json.dumps(key, sort_keys=True).encode())
    read = {m + ".tsv" for m in train_manifests(corpus)} | set(CORPUS_FILES)
    for name in sorted(os.listdir(corpus)):
        if name in read:
            with open(os.path.join(corpus, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ main
def pretrain(corpus: str, out: str, size: str = "default", seed: int = 1, force: bool = False,
             only: Sequence[str] = BACKBONES) -> dict:
    """Train the stand-ins on the corpus and save them under ``out`` (or reuse a cached result).

    Args:
        corpus (str): the toy corpus folder (with ``corpus.json``).
        out (str): folder for ``whisper/``, ``wavlm/``, ``llama/`` and ``stage0.json``.
        size (str): a key of ``SETTINGS``.
        seed (int): seed of every stand-in's initialisation and batches.
        force (bool): retrain even when ``stage0.json`` holds the same key.
        only (Sequence[str]): which of ``BACKBONES`` to train (the real small recipe: ``wavlm``, the acoustic
            branch no pretrained model on pip provides).

    Returns:
        dict: what ``stage0.json`` records (key, settings, held-out checks, seconds per model).
    """
    corpus, out = os.path.abspath(corpus), os.path.abspath(out)
    if not os.path.isfile(os.path.join(corpus, "corpus.json")):
        raise SystemExit(f"{corpus} is not a toy corpus (no corpus.json): run wavllm-make-toy-corpus first")
    unknown = sorted(set(only) - set(BACKBONES))
    if unknown or not only:
        raise SystemExit(f"stage 0 trains {', '.join(BACKBONES)}; got {sorted(only)}")
    fp = fingerprint(corpus, size, seed, only=only)
    done_path = os.path.join(out, "stage0.json")
    if not force and os.path.isfile(done_path):
        with open(done_path) as f:
            done = json.load(f)
        if done.get("fingerprint") == fp and all(os.path.isdir(os.path.join(out, d)) for d in only):
            log(f"cached: {out} (same corpus, settings and code); --force retrains")
            return done
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    cfg = SETTINGS[size]
    t0 = time.time()
    tok = None
    if "llama" in only:
        tok = train_sentencepiece(tokenizer_texts(corpus), os.path.join(out, "llama"), vocab_size=cfg["vocab"])
        log(f"tokenizer: {len(tok)} pieces -> {tok.path}")
    result = {"fingerprint": fp, "corpus": corpus, "size": size, "seed": seed, "settings": cfg, "trained": list(only)}
    timings = {}
    for name, fn in (("llama", lambda: train_llama(corpus, out, cfg["llama"], seed, tok)),
                     ("whisper", lambda: train_whisper(corpus, out, cfg["whisper"], seed)),
                     ("wavlm", lambda: train_wavlm(corpus, out, cfg["wavlm"], seed))):
        if name not in only:
            continue
        t = time.time()
        result.update(fn())
        timings[name] = round(time.time() - t, 1)
    result["seconds"] = timings
    result["total_seconds"] = round(time.time() - t0, 1)
    with open(done_path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(done_path + ".tmp", done_path)
    log(f"done in {result['total_seconds']} s -> {out}/{{{','.join(only)}}}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``wavllm-toy-pretrain`` on ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    p = argparse.ArgumentParser(prog="wavllm-toy-pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="toy corpus folder (wavllm-make-toy-corpus --out)")
    p.add_argument("--out", required=True, help="folder for whisper/, wavlm/ and llama/ (with tokenizer.model)")
    p.add_argument("--size", choices=sorted(SETTINGS), default="default")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--force", action="store_true", help="retrain even when a cached result matches")
    p.add_argument("--only", default=",".join(BACKBONES),
                   help="comma list of the stand-ins to train (default: all; the real small recipe: wavlm)")
    args = p.parse_args(argv)
    pretrain(args.corpus, args.out, args.size, args.seed, args.force,
             only=tuple(b for b in args.only.split(",") if b))
    return 0
