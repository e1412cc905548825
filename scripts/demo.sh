#!/usr/bin/env bash
# Set up (if needed), condense the shipped demo MoE with CD-MoE, print the summary, and
# check that the output loads with plain transformers (a fresh process without cdmoe).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/demo-condensed}
cdmoe condense demo/model --out "$OUT" --layers 4 \
  --calib demo/data/valid.txt.gz --samples 100 --seq-len 256 \
  --eval-text demo/data/test.txt.gz --eval-tokens 40000 --force "$@"
python - "$OUT" <<'PY'
import sys
sys.modules["cdmoe"] = None  # load as a user without cdmoe would
from transformers import AutoModelForCausalLM, AutoTokenizer
out = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(out)
ids = tok("The interpreter reads", return_tensors="pt").input_ids
text = tok.decode(model.generate(ids, max_new_tokens=20, do_sample=False)[0])
print(f"loaded {out} with plain transformers ({type(model).__name__}); greedy sample: {text!r}")
PY
