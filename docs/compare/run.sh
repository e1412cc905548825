#!/usr/bin/env bash
# Regenerates docs/compare-report.md's tables on the shipped demo model:
#   methods     CD-MoE vs the baselines at 80% / 65% memory budgets
#   quantized   condense / drop alone, quantise alone, and both, at 55% / 45%
#   ablations   the CD-MoE ablations at 80% / 65%
# Every point is scored on perplexity and the local lm-eval demo tasks; the first two runs also
# measure peak RAM. About 2 hours on 2 otherwise idle CPU cores (bitsandbytes runs slowly on CPU).
# Pass the names of the runs to redo only those, e.g. `bash docs/compare/run.sh quantized`.
set -euo pipefail
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
COMMON="--calib demo/data/valid.txt.gz --samples 32 --seq-len 128 --eval-text demo/data/test.txt.gz --eval-tokens 10000
 --tasks demo --task-text demo/data/test.txt.gz --force"
QUANTIZED="cd-moe,cd-moe-s,layer-drop,expert-drop,slim-int8,slim-int4,cd-moe+int8,cd-moe+int4,layer-drop+int8,layer-drop+int4"
for name in "${@:-methods quantized ablations}"; do
  for run in $name; do
    case $run in
      methods)   cdmoe compare demo/model --out runs/compare-methods --budget 0.8,0.65 --methods default --peak-rss $COMMON ;;
      quantized) cdmoe compare demo/model --out runs/compare-quantized --budget 0.55,0.45 --methods $QUANTIZED --peak-rss $COMMON ;;
      ablations) cdmoe compare demo/model --out runs/compare-ablations --budget 0.8,0.65 --methods cd-moe,cd-moe-s,ablations $COMMON ;;
      *) echo "unknown run $run (methods | quantized | ablations)" >&2; exit 2 ;;
    esac
    mkdir -p docs/compare/$run
    cp runs/compare-$run/compare.md runs/compare-$run/compare.json runs/compare-$run/compare.png docs/compare/$run/
  done
done
