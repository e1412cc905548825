#!/usr/bin/env bash
# Re-resolve cdmoe's dependencies from pyproject.toml's ranges in a fresh virtualenv and write the
# exact versions to scripts/constraints.txt (then run bash scripts/test.sh and commit both if green).
set -euo pipefail
cd "$(dirname "$0")/.."
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"${PYTHON:-python3}" -m venv "$TMP/venv"
"$TMP/venv/bin/python" -m pip install -q --upgrade pip
"$TMP/venv/bin/python" -m pip install -q "torch==2.13.0"
"$TMP/venv/bin/python" -m pip install -q -e ".[dev]"
{
  echo "# Exact versions the test suite was last verified with (CI and scripts/setup.sh install these)."
  echo "# Users keep pyproject.toml's ranges. Refresh: bash scripts/refresh-constraints.sh"
  "$TMP/venv/bin/python" -m pip freeze --exclude-editable | grep -v '^-e ' | sed 's/^torch==\([0-9.]*\)+cpu$/torch==\1/'
} > scripts/constraints.txt
echo "wrote scripts/constraints.txt; now run: bash scripts/test.sh"
