"""Load a condensed output directory as a user without cdmoe would, and re-measure it.

    python scripts/check_output.py runs/demo-condensed

cdmoe is made unimportable; the directory is loaded with plain transformers
(``trust_remote_code=True``), its held-out perplexity is recomputed here with a loop
written independently of cdmoe (same text, windows and token budget as recorded in
``cdmoe.json``) and compared with the value the condense run measured in memory.
"""

import gzip
import json
import math
import sys
from pathlib import Path

sys.modules["cdmoe"] = None  # as where cdmoe is not installed

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

out = Path(sys.argv[1])
record = json.loads((out / "cdmoe.json").read_text())
model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
print(f"loaded {out} with plain transformers: {type(model).__name__}, "
      f"{sum(p.numel() for p in model.parameters()):,} parameters")

ev = record.get("evaluation")
if ev:
    raw = Path(ev["text"]).read_bytes()
    text = gzip.decompress(raw).decode() if ev["text"].endswith(".gz") else raw.decode()
    ids = []
    for doc in (d.strip() for d in text.split("\n\n")):
        if doc:
            ids += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= ev["tokens"]:
            break
    stream = torch.tensor(ids[: ev["tokens"]])
    nll, count, seq = 0.0, 0, ev["seq_len"]
    with torch.no_grad():
        for start in range(0, len(stream) - 1, seq):
            window = stream[start : start + seq].unsqueeze(0)
            if window.shape[1] < 2:
                break
            logits = model(input_ids=window).logits.float()
            nll += float(F.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum"))
            count += window.shape[1] - 1
    ppl = math.exp(nll / count)
    print(f"held-out perplexity re-measured from disk: {ppl:.3f} (condense run, in memory: {ev['condensed_ppl']:.3f})")
    if abs(ppl - ev["condensed_ppl"]) > 1e-3 * ev["condensed_ppl"]:
        sys.exit("error: the saved model does not reproduce the condensed model's perplexity")
prompt = tok("The interpreter reads", return_tensors="pt").input_ids
sample = tok.decode(model.generate(prompt, max_new_tokens=24, do_sample=False)[0])
print(f"greedy sample: {sample!r}")
