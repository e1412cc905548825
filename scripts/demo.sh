#!/usr/bin/env bash
# Set up (if needed), condense the shipped demo MoE with CD-MoE, print the summary, and
# check that the output loads with plain transformers (a fresh process without cdmoe) and
# gives the perplexity the condense run measured in memory.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
OUT=${OUT:-runs/demo-condensed}
cdmoe condense demo/model --out "$OUT" --layers 4 \
  --calib demo/data/valid.txt.gz --samples 100 --seq-len 256 \
  --eval-text demo/data/test.txt.gz --eval-tokens 40000 --force "$@"
python scripts/check_output.py "$OUT"
