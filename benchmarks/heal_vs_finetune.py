"""Healing vs ``cdmoe finetune`` at equal compute time on the shipped demo model: which closes more of the gap.

    python benchmarks/heal_vs_finetune.py [--layers 6] [--experts 4] [--out runs/heal-vs-finetune]

1. ``cdmoe condense`` demo/model at N = ``--layers``, K = ``--experts`` (the comparison's calibration:
   32 windows x 128 tokens of demo/data/valid.txt.gz), held-out perplexity on 10,000 tokens of
   demo/data/test.txt.gz (the original's and the condensed model's).
2. ``cdmoe heal`` it with the default options, on the search's 32 windows and on 256 windows of the same
   file (``--samples 256``); the CPU time of each call (this process, all threads: loading the original,
   the layer walk, writing the output) is a budget T. CPU time, not wall time: other jobs share this
   machine's cores, and CPU time is what each run is charged for either way (wall times are printed too).
3. ``cdmoe finetune`` the same condensed directory (the condensed layers, language-model loss on
   demo/data/valid.txt.gz, 128-token blocks, batch 8, the default lr 1e-4, warm-up and cosine) for as many
   steps as fit in each T: a 20- and a 40-step run measure the CPU time per step and the fixed cost.

Prints one table: perplexity, the share of the condensed-vs-original gap each closes, CPU and wall
seconds, all measured in this run. Writes ``result.json`` under ``--out``.
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


def timed(fn, *args, **kwargs) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of ``fn(*args, **kwargs)``."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn(*args, **kwargs)
    return time.process_time() - cpu, time.perf_counter() - wall


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
    budgets = {}
    for samples in (None, 256):
        name = f"healed, {samples or SAMPLES} windows"
        budgets[name] = timed(cdmoe.heal, condensed, out / f"healed-{samples or SAMPLES}", samples=samples, force=True)
        rows[name] = (ppl(out / f"healed-{samples or SAMPLES}"), budgets[name])

    def tune(steps: int, name: str) -> tuple[float, float]:
        options = FinetuneOptions(data=CALIB, steps=steps, seq_len=SEQ_LEN, batch_size=8, save_steps=10_000,
                                  logging_steps=10_000)
        return timed(finetune, condensed, out / name, options, EvalOptions(), force=True, show_progress=False,
                     log=lambda *_: None)

    short, longer = tune(20, "probe-20")[0], tune(40, "probe-40")[0]
    per_step = max((longer - short) / 20, 1e-6)
    for heal_name, (cpu, _) in budgets.items():
        steps = max(1, round((cpu - (short - 20 * per_step)) / per_step))
        seconds = tune(steps, f"finetune-{steps}")
        rows[f"finetune, {steps} steps (as {heal_name.split(', ')[1]})"] = (ppl(out / f"finetune-{steps}"), seconds)
    orig, cond = rows["original"][0], rows["condensed"][0]
    print(f"demo model, N={args.layers}, K={args.experts}; held-out perplexity on {len(stream):,} tokens of {TEST}")
    print(f"{'':44s} {'perplexity':>10s} {'gap closed':>10s} {'CPU s':>8s} {'wall s':>8s}")
    result = {"layers": args.layers, "experts": args.experts, "eval_tokens": len(stream), "rows": {}}
    for name, (value, seconds) in rows.items():
        gap = (cond - value) / (cond - orig) if seconds is not None else None
        result["rows"][name] = {"ppl": value, "gap_closed": gap, "cpu_seconds": seconds and seconds[0],
                                "wall_seconds": seconds and seconds[1]}
        times = f"{seconds[0]:8.1f} {seconds[1]:8.1f}" if seconds else ""
        print(f"{name:44s} {value:10.2f} {'' if gap is None else f'{100 * gap:9.1f}%':>10s} {times}")
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
