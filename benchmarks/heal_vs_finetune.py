"""Healing vs ``cdmoe finetune`` at equal wall time on the shipped demo model: which closes more of the gap.

    python benchmarks/heal_vs_finetune.py [--layers 6] [--experts 4] [--out runs/heal-vs-finetune]

1. ``cdmoe condense`` demo/model at N = ``--layers``, K = ``--experts`` (the comparison's calibration:
   32 windows x 128 tokens of demo/data/valid.txt.gz), held-out perplexity on 10,000 tokens of
   demo/data/test.txt.gz (the original's and the condensed model's).
2. ``cdmoe heal`` it with the default options on the same calibration windows; its wall time T (the
   whole call: loading the original, the layer walk, writing the output) is the budget.
3. ``cdmoe finetune`` the same condensed directory (the condensed layers, language-model loss, on
   demo/data/valid.txt.gz, 128-token blocks, batch 8) for as many steps as fit in T: a 20-step run
   measures the time per step and the fixed cost, then one run per learning rate (1e-4, the default,
   and 1e-3) with that many steps; each run's wall time is printed beside T.

Prints one table: perplexity and the share of the condensed-vs-original gap each closes, and the
wall times, all measured in this run. Writes ``result.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cdmoe
from cdmoe.evaluation.perplexity import perplexity, token_stream
from cdmoe.methods.condense import EvalOptions
from cdmoe.methods.finetune import FinetuneOptions, finetune
from cdmoe.models.loading import load_model, load_tokenizer

DEMO, CALIB, TEST = "demo/model", "demo/data/valid.txt.gz", "demo/data/test.txt.gz"
SAMPLES, SEQ_LEN, EVAL_TOKENS = 32, 128, 10_000


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--out", default="runs/heal-vs-finetune")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(DEMO)
    stream = token_stream(tokenizer, TEST, EVAL_TOKENS)
    ppl = lambda path: perplexity(load_model(path), stream, SEQ_LEN)  # noqa: E731

    condensed = out / "condensed"
    cdmoe.condense(DEMO, condensed, layers=args.layers, experts=args.experts, calib=CALIB, samples=SAMPLES,
                   seq_len=SEQ_LEN, force=True)
    rows = {"original": (ppl(DEMO), None), "condensed": (ppl(condensed), None)}
    _, budget = timed(cdmoe.heal, condensed, out / "healed", force=True)
    rows["healed (cdmoe heal, defaults)"] = (ppl(out / "healed"), budget)

    def tune(steps: int, lr: float, name: str) -> float:
        options = FinetuneOptions(data=CALIB, steps=steps, lr=lr, seq_len=SEQ_LEN, batch_size=8, save_steps=10_000,
                                  logging_steps=10_000)
        _, seconds = timed(finetune, condensed, out / name, options, EvalOptions(), force=True, show_progress=False,
                           log=lambda *_: None)
        return seconds

    short = tune(20, 1e-4, "probe-20")
    longer = tune(40, 1e-4, "probe-40")
    per_step = max((longer - short) / 20, 1e-6)
    steps = max(1, round((budget - (short - 20 * per_step)) / per_step))
    for lr in (1e-4, 1e-3):
        seconds = tune(steps, lr, f"finetune-lr{lr:g}")
        rows[f"finetune, {steps} steps, lr {lr:g}"] = (ppl(out / f"finetune-lr{lr:g}"), seconds)

    orig, cond = rows["original"][0], rows["condensed"][0]
    print(f"demo model, N={args.layers}, K={args.experts}; held-out perplexity on {len(stream):,} tokens of {TEST}")
    print(f"{'':40s} {'perplexity':>10s} {'gap closed':>10s} {'wall s':>8s}")
    result = {"layers": args.layers, "experts": args.experts, "eval_tokens": len(stream), "rows": {}}
    for name, (value, seconds) in rows.items():
        gap = (cond - value) / (cond - orig) if name not in ("original", "condensed") else None
        result["rows"][name] = {"ppl": value, "gap_closed": gap, "seconds": seconds}
        print(f"{name:40s} {value:10.2f} {'' if gap is None else f'{100 * gap:9.1f}%':>10s} "
              f"{'' if seconds is None else f'{seconds:8.1f}':>8s}")
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
