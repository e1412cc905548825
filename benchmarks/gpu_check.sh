#!/usr/bin/env bash
# All GPU checks in one run (benchmarks/gpu_check.py): condense whole/sequential on the GPU at real widths,
# fp32 GPU vs CPU, every command with --device cuda, peaks against `cdmoe plan`. Results in $OUT (the device
# tool's output folder) or runs/gpu-check. Uses the machine's python3 with cdmoe from src/ (no install);
# prints what is missing if an import fails.
#   bash benchmarks/gpu_check.sh                       # on a CUDA machine
#   CHECK_ARGS="--device cpu --small" bash benchmarks/gpu_check.sh   # the script itself, on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-runs}/gpu-check
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" - <<'PYEOF'
import importlib.util, sys
need = ["torch", "transformers", "accelerate", "safetensors", "typer", "rich", "psutil", "datasets", "matplotlib", "peft"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
import torch, transformers
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}; GPUs: "
      f"{[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else 'none'}")
if missing:
    sys.exit(f"missing packages: {', '.join(missing)}")
PYEOF
"$PY" benchmarks/gpu_check.py --out "$OUT_DIR" ${CHECK_ARGS:-} 2>&1 | tee "$OUT_DIR.log"
