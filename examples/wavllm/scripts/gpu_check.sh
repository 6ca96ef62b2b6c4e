#!/usr/bin/env bash
# The GPU check (wavllm_fairseq/bench/gpu_check.py): training-step memory/time of wavllm_7b with and without
# activation checkpointing, the real CLIs on CUDA with bf16 (with the package's toy yamls unless
# --config-dir DIR names others), the decoding benchmark, bf16 batch invariance; one table at the end.
# Nothing is downloaded.
#   bash examples/wavllm/scripts/gpu_check.sh [--out DIR] [--only memory cli decode invariance] ...
# A machine without this project's dependencies: put their wheels in WHEELS (default .whl, made where
# PyPI is reachable by ../shared/gpu/wheels.sh or `pip download`) and they are installed to a private
# target first; otherwise the installed packages are used.
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
if ! $PY -c "import fairseq, hydra, sentencepiece, soundfile" >/dev/null 2>&1; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "[gpu_check] installing the wheels in $WHEELS to /tmp/wavllm_site"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/wavllm_site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/wavllm_site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "[gpu_check] fairseq / hydra / sentencepiece / soundfile missing and no wheels in $WHEELS" >&2
    exit 2
  fi
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
exec $PY -m wavllm_fairseq.bench.gpu_check "$@"
