#!/usr/bin/env bash
# Installs what is missing, then runs the whole test suite (slow end-to-end tests included:
# select them with `-m slow`, skip them with `-m "not slow"`). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../../.."
bash examples/wavllm/scripts/install.sh
PY=${PYTHON:-python3}
set +e
$PY -m pytest -q -p no:cacheprovider tests "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "no tests were collected: failing on purpose" >&2
  exit 1
fi
exit "$rc"
