"""Held-out quality of the demo model next to a unigram model and chance.

    python demo/evaluate_demo.py [--model demo/model]

Prints token-level perplexity on the test split (non-overlapping 256-token windows) and
multiple-choice cloze accuracy (the true 10-word continuation of a 30-word paragraph
start vs three continuations from other paragraphs; chance 25%) for the model and for a
unigram model fitted on the validation split (add-one smoothing).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cdmoe.evaluation.demo_tasks import cloze_items  # noqa: E402
from cdmoe.evaluation.perplexity import perplexity, token_stream  # noqa: E402
from cdmoe.models.loading import load_model, load_tokenizer  # noqa: E402
from cdmoe.search.calibration import read_documents  # noqa: E402


@torch.no_grad()
def choice_logprob(model, tok, context: str, choice: str) -> float:
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(context + " " + choice, add_special_tokens=False)["input_ids"][len(ctx):]
    logp = model(input_ids=torch.tensor([ctx + cont])[:, :-1]).logits.float().log_softmax(-1)[0]
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "demo" / "model"))
    ap.add_argument("--items", type=int, default=400)
    args = ap.parse_args()
    model, tok = load_model(args.model), load_tokenizer(args.model)
    test = ROOT / "demo" / "data" / "test.txt.gz"
    stream = token_stream(tok, test)
    ppl = perplexity(model, stream, seq_len=256)

    counts = Counter(token_stream(tok, ROOT / "demo" / "data" / "valid.txt.gz").tolist())
    total, vocab = sum(counts.values()), len(tok)
    logp = {t: math.log((counts[t] + 1) / (total + vocab)) for t in range(vocab)}
    unigram_ppl = math.exp(-sum(logp[t] for t in stream[1:].tolist()) / (len(stream) - 1))

    items = cloze_items(read_documents(test), n_items=args.items)
    model_acc = unigram_acc = 0
    for item in items:
        scores = [choice_logprob(model, tok, item["context"], c) for c in item["choices"]]
        model_acc += int(max(range(4), key=scores.__getitem__) == item["label"])
        uni = [sum(logp[t] for t in tok(" " + c, add_special_tokens=False)["input_ids"]) for c in item["choices"]]
        unigram_acc += int(max(range(4), key=uni.__getitem__) == item["label"])
    result = {
        "model": args.model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "test_tokens": len(stream),
        "perplexity": ppl,
        "unigram_perplexity": unigram_ppl,
        "cloze_items": len(items),
        "cloze_accuracy": 100 * model_acc / len(items),
        "unigram_cloze_accuracy": 100 * unigram_acc / len(items),
        "chance_cloze_accuracy": 25.0,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
