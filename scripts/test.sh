#!/usr/bin/env bash
# Set up (if needed) and run the test suite on two workers (pytest-xdist; a test file stays on one
# worker, so module fixtures such as the vLLM runs are built once).
# CDMOE_VLLM=0 skips the vLLM venv (scripts/setup_vllm.sh; the serving tests then skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${CDMOE_VLLM:-1}" != 0 ]; then bash scripts/setup_vllm.sh; fi
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -n "${CDMOE_TEST_WORKERS:-2}" --dist loadfile "$@"
