#!/usr/bin/env bash
# Regenerates docs/compare-report.md's tables: CD-MoE vs the baselines, then the CD-MoE ablations,
# on the shipped demo model at two memory budgets. About 30-40 minutes on 2 otherwise idle CPU cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
COMMON="--budget 0.8,0.65 --calib demo/data/valid.txt.gz --samples 32 --seq-len 128 --eval-text demo/data/test.txt.gz --eval-tokens 10000 --force"
cdmoe compare demo/model --out runs/compare-methods --methods default $COMMON
cdmoe compare demo/model --out runs/compare-ablations --methods cd-moe,cd-moe-s,ablations $COMMON
for name in methods ablations; do
  mkdir -p docs/compare/$name
  cp runs/compare-$name/compare.md runs/compare-$name/compare.json runs/compare-$name/compare.png docs/compare/$name/
done
