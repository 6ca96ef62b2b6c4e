#!/usr/bin/env bash
# The main job on the embedded toy default: installs what is missing, synthesizes the espeak-ng toy
# corpus, pretrains the toy backbones (stage 0, cached), trains stage 1 and stage 2 with
# fairseq-hydra-train, decodes every test manifest with fairseq-generate and prints per-task scores.
# Extra arguments go to `python -m wavllm_fairseq.toy.pipeline` (e.g. --size small, --work DIR).
set -euo pipefail
cd "$(dirname "$0")/../../.."
bash examples/wavllm/scripts/install.sh
PY=${PYTHON:-python3}
exec $PY -m wavllm_fairseq.toy.pipeline "$@"
