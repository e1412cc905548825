#!/usr/bin/env bash
# One-time set-up, idempotent: a virtualenv in .venv with torch 2.13.0 (installed first, so
# pip never pulls a multi-GB CUDA build on a CPU machine) and cdmoe with its dev extras, at the
# exact versions of scripts/constraints.txt (what the suite was last verified with; users who
# pip install cdmoe get pyproject.toml's ranges instead).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[dev]" -c scripts/constraints.txt
