"""Prefill and decode throughput of an original vs a condensed model, measured in one run.

    python benchmarks/inference_speed.py demo/model runs/demo-condensed

Same prompts (windows of the demo test split) for both; each measurement is preceded by
warm-up runs and repeated, and the median is reported. Prefill: tokens/s of one forward
pass over ``batch x prompt_len`` tokens. Decode: new tokens/s of greedy generation of
``new_tokens`` tokens with the KV cache after the prompt. The two models alternate within
each repeat so that machine noise hits both alike. Speed-up = condensed / original.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
from cdmoe.evaluation.perplexity import token_stream  # noqa: E402
from cdmoe.models.loading import load_model, load_tokenizer  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("original")
    ap.add_argument("condensed")
    ap.add_argument("--text", default=str(ROOT / "demo" / "data" / "test.txt.gz"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    models = {"original": load_model(args.original, dtype=args.dtype),
              "condensed": load_model(args.condensed, dtype=args.dtype)}
    tok = load_tokenizer(args.original)
    stream = token_stream(tok, args.text, args.batch * args.prompt_len)
    prompts = stream[: args.batch * args.prompt_len].reshape(args.batch, args.prompt_len)

    def prefill(model):
        with torch.no_grad():
            model(input_ids=prompts, use_cache=False)

    def decode(model):
        with torch.no_grad():
            model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens,
                           do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)

    times = {name: {"prefill": [], "generate": []} for name in models}
    for _ in range(args.warmup):
        for model in models.values():
            prefill(model)
            decode(model)
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name]["prefill"].append(timed(lambda: prefill(model)))
            times[name]["generate"].append(timed(lambda: decode(model)))

    result = {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "models": {}}
    for name in models:
        pre = statistics.median(times[name]["prefill"])
        gen = statistics.median(times[name]["generate"])
        decode_s = max(gen - pre, 1e-9)  # generation = one prefill + new_tokens decode steps
        result["models"][name] = {
            "prefill_tokens_per_s": args.batch * args.prompt_len / pre,
            "decode_tokens_per_s": args.batch * args.new_tokens / decode_s,
            "prefill_s_median": pre, "generate_s_median": gen,
        }
    o, c = result["models"]["original"], result["models"]["condensed"]
    result["speedup"] = {"prefill": c["prefill_tokens_per_s"] / o["prefill_tokens_per_s"],
                         "decode": c["decode_tokens_per_s"] / o["decode_tokens_per_s"]}
    print(f"prefill: original {o['prefill_tokens_per_s']:.0f} tok/s, condensed {c['prefill_tokens_per_s']:.0f} tok/s "
          f"-> speed-up {result['speedup']['prefill']:.2f}x")
    print(f"decode:  original {o['decode_tokens_per_s']:.0f} tok/s, condensed {c['decode_tokens_per_s']:.0f} tok/s "
          f"-> speed-up {result['speedup']['decode']:.2f}x")
    per_repeat = {  # the spread: each repeat's ratio (the two models alternate within a repeat)
        "prefill": [o_t / c_t for o_t, c_t in zip(times["original"]["prefill"], times["condensed"]["prefill"])],
        "decode": [max(og - op, 1e-9) / max(cg - cp, 1e-9) for og, op, cg, cp in
                   zip(times["original"]["generate"], times["original"]["prefill"],
                       times["condensed"]["generate"], times["condensed"]["prefill"])],
    }
    result["speedup_per_repeat"] = per_repeat
    print(f"(median of {args.repeats} after {args.warmup} warm-up runs; batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, {args.threads} threads; per-repeat speed-ups: prefill "
          f"{min(per_repeat['prefill']):.2f}-{max(per_repeat['prefill']):.2f}x, decode "
          f"{min(per_repeat['decode']):.2f}-{max(per_repeat['decode']):.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
