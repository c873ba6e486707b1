#!/usr/bin/env bash
# Set up nestlearn in the current Python environment, then run the demo or the test suite.
#   bash scripts/bootstrap.sh demo [section.key=value ...]   # the main job
#   bash scripts/bootstrap.sh test [pytest args ...]         # the tests
# torch is installed only when none is importable (torch==2.13.0, a CPU build on CPU machines),
# so an existing CUDA build is left alone. Use PYTHON=/path/to/python to pick the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
task=${1:-demo}
shift || true

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "bootstrap: no torch found; installing torch==2.13.0"
  "$PY" -m pip install --quiet "torch==2.13.0"
fi

case "$task" in
  demo)
    "$PY" -m pip install --quiet -e .
    exec "$PY" -m nestlearn demo "$@"
    ;;
  test)
    "$PY" -m pip install --quiet -e ".[dev,hf]"
    exec "$PY" -m pytest "$@"
    ;;
  *)
    echo "usage: bash scripts/bootstrap.sh {demo|test} [args...]" >&2
    exit 2
    ;;
esac
