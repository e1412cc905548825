#!/usr/bin/env bash
# Regenerates docs/compare-report.md's tables on the shipped demo model:
#   methods     CD-MoE vs the baselines at 80% / 65% memory budgets (perplexity, lm-eval demo tasks, peak RAM)
#   quantized   condense alone, quantise alone, condense + quantise, Layer Drop + quantise at 55% / 45%, with
#               bitsandbytes NF4 and compressed-tensors W4A16, and the budget planner + W4A16
#               (perplexity, lm-eval demo tasks, peak RAM)
#   ablations   the CD-MoE ablations at 80% / 65% (perplexity, lm-eval demo tasks)
#   msmoe       only M-SMoE (MC-SMoE's reference) and its router-restricted variant at 80% / 65%, the same
#               settings as methods (not run by default; methods includes both)
#   reap        only Expert Drop and REAP at 80% / 65%, the same settings as methods (not run by default;
#               methods includes both)
#   heal        CD-MoE and CD-MoE-S, each alone and healed (cdmoe heal's defaults) at 80% / 65% (not run by
#               default; about 10 minutes)
#   w8a8        compressed-tensors W8A8 points (condense, Layer Drop, the budget planner, quantise alone) against CD-MoE and
#               CD-MoE + bitsandbytes int4 at 55% / 45% (perplexity, prefill speed in transformers; not run by
#               default; about 1 minute)
#   budget      the budget planner against each single method at 80% / 65% / 50% (perplexity; not run by
#               default; about 10 minutes)
# About 11 minutes for methods, 6 for quantized and 9 for ablations on 2 CPU cores (bitsandbytes
# runs slowly on CPU). Name runs to redo only those: `bash docs/compare/run.sh quantized`.
set -euo pipefail
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
COMMON="--calib demo/data/valid.txt.gz --samples 32 --seq-len 128 --eval-text demo/data/test.txt.gz --eval-tokens 10000 --force"
TASKS="--tasks demo --task-text demo/data/test.txt.gz"
for run in ${@:-methods quantized ablations}; do
  case $run in
    methods)   cdmoe compare demo/model --out runs/compare-methods --budget 0.8,0.65 --methods default $TASKS --peak-rss $COMMON ;;
    quantized) cdmoe compare demo/model --out runs/compare-quantized --budget 0.55,0.45 $TASKS --peak-rss $COMMON \
                 --methods cd-moe,layer-drop,slim-int4,cd-moe+int4,layer-drop+int4,slim-w4a16,cd-moe+w4a16,budget+w4a16 ;;
    ablations) cdmoe compare demo/model --out runs/compare-ablations --budget 0.8,0.65 --methods cd-moe,cd-moe-s,ablations $TASKS $COMMON ;;
    msmoe)     cdmoe compare demo/model --out runs/compare-msmoe --budget 0.8,0.65 --methods msmoe,msmoe-restricted $TASKS --peak-rss $COMMON ;;
    reap)      cdmoe compare demo/model --out runs/compare-reap --budget 0.8,0.65 --methods expert-drop,reap $TASKS --peak-rss $COMMON ;;
    heal)      cdmoe compare demo/model --out runs/compare-heal --budget 0.8,0.65 --methods cd-moe,cd-moe+heal,cd-moe-s,cd-moe-s+heal $TASKS $COMMON ;;
    w8a8)      cdmoe compare demo/model --out runs/compare-w8a8 --budget 0.55,0.45 $COMMON \
                 --methods cd-moe,slim-w8a8,cd-moe+w8a8,layer-drop+w8a8,cd-moe+int4,budget+w8a8 ;;
    budget)    cdmoe compare demo/model --out runs/compare-budget --budget 0.8,0.65,0.5 $COMMON \
                 --methods budget,cd-moe,cd-moe-s,expert-drop,reap,layer-drop ;;
    *) echo "unknown run $run (methods | quantized | ablations | msmoe | reap | heal | w8a8 | budget)" >&2; exit 2 ;;
  esac
  mkdir -p docs/compare/$run
  cp runs/compare-$run/compare.md runs/compare-$run/compare.json runs/compare-$run/compare.png docs/compare/$run/
done
