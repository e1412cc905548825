"""Healing options tried on the demo model: held-out perplexity of each, the default beside them, one run.

    python benchmarks/heal_settings.py CONDENSED [--out runs/heal-settings]

CONDENSED: a condensed directory of demo/model (e.g. runs/heal-vs-finetune/condensed from
benchmarks/heal_vs_finetune.py: N = 6, K = 4, 32 x 128 calibration tokens). Each setting heals it on the
record's calibration windows with one option changed from the defaults (relative step size ``lr``,
tokens per step ``batch_tokens``, ``steps``) and is scored on 10,000 held-out tokens of demo/data/test.txt.gz.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cdmoe
from cdmoe.evaluation.perplexity import perplexity, token_stream
from cdmoe.models.loading import load_model, load_tokenizer

SETTINGS = {"defaults": {}, "lr 0.01": {"lr": 0.01}, "lr 0.2": {"lr": 0.2}, "batch 1,024 tokens": {"batch_tokens": 1024},
            "1,000 steps": {"steps": 1000}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("condensed")
    parser.add_argument("--out", default="runs/heal-settings")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stream = token_stream(load_tokenizer("demo/model"), "demo/data/test.txt.gz", 10_000)
    ppl = lambda path: perplexity(load_model(path), stream, 128)  # noqa: E731
    original, condensed = ppl("demo/model"), ppl(args.condensed)
    print(f"original {original:.2f}, condensed {condensed:.2f} ({args.condensed})")
    result = {"original": original, "condensed": condensed, "settings": {}}
    for i, (name, options) in enumerate(SETTINGS.items()):
        started = time.perf_counter()
        record = cdmoe.heal(args.condensed, out / f"setting-{i}", force=True, **options)
        seconds = time.perf_counter() - started
        value = ppl(out / f"setting-{i}")
        val = [f["error_after"]["val"] for f in record["heal"]["layers"].values()]
        result["settings"][name] = {"ppl": value, "gap_closed": (condensed - value) / (condensed - original),
                                    "val_error_after": val, "seconds": seconds}
        print(f"{name:20s} perplexity {value:7.2f}  gap closed {100 * (condensed - value) / (condensed - original):5.1f}%"
              f"  held-out layer errors {min(val):.3f}-{max(val):.3f}  {seconds:.0f}s")
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
