"""Which search setting picks better layers? Held-out perplexity after condensing N layers.

    python benchmarks/search_settings.py                    # the demo model, N = 1..5

For each setting (final-output distribution of Algorithm 2: normed hidden state vs
vocabulary logits; metric JS vs KL vs PPL), one greedy search for the largest N gives
every N (the order for N is a prefix of the order for N+1). Each N is then condensed in
memory and scored by perplexity on the demo test split. Same calibration for all.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cdmoe.evaluation.perplexity import perplexity, token_stream
from cdmoe.methods.ablations import fused_modules, swapped_blocks
from cdmoe.models.loading import load_model, load_tokenizer
from cdmoe.search.calibration import CalibSpec, load_calibration
from cdmoe.search.run import SearchOptions, run_search

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"js / hidden": ("js", "hidden"), "js / logits": ("js", "logits"), "kl / hidden": ("kl", "hidden"),
            "ppl / logits": ("ppl", "logits")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "demo" / "model"))
    ap.add_argument("--calib", default=str(ROOT / "demo" / "data" / "valid.txt.gz"))
    ap.add_argument("--text", default=str(ROOT / "demo" / "data" / "test.txt.gz"))
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-layers", type=int, default=5)
    ap.add_argument("--eval-tokens", type=int, default=40_000)
    args = ap.parse_args()
    model, tok = load_model(args.model), load_tokenizer(args.model)
    ids = load_calibration(tok, CalibSpec(args.calib, args.samples, args.seq_len))
    stream = token_stream(tok, args.text, args.eval_tokens)
    base = perplexity(model, stream, args.seq_len)
    print(f"original perplexity {base:.2f} on {len(stream):,} test tokens; rows: perplexity after condensing N layers")
    header = "setting".ljust(14) + "".join(f"N={n}".rjust(9) for n in range(1, args.max_layers + 1)) + "   order"
    print(header)
    for name, (metric, final) in SETTINGS.items():
        result = run_search(model, ids, SearchOptions(layers=args.max_layers, metric=metric, final=final))
        row = []
        for n in range(1, args.max_layers + 1):
            with swapped_blocks(model, fused_modules(model, result.choices[:n])), torch.no_grad():
                row.append(perplexity(model, stream, args.seq_len))
        print(name.ljust(14) + "".join(f"{p:9.2f}" for p in row) + f"   {[c.layer for c in result.choices]}")


if __name__ == "__main__":
    main()
