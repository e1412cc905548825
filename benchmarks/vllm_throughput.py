"""Output-token throughput of an original vs a condensed model (and more: quantised ones) served by vLLM.

    .venv-vllm/bin/python benchmarks/vllm_throughput.py ORIGINAL_DIR CONDENSED_DIR [--also NAME=DIR ...]
    # quantised outputs too (cdmoe baseline slim / condense --quantize w8a8), same prompts, same run:
    #   ... demo/model runs/demo-condensed --also w8a8=runs/demo-w8a8 --also condensed+w8a8=runs/demo-condensed-w8a8
    # the demo model:  bash scripts/demo.sh, then
    VLLM_MLA_DISABLE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python benchmarks/vllm_throughput.py \
        demo/model runs/demo-condensed --dtype float32 --eager

Run with the vLLM venv's Python (scripts/setup_vllm.sh; the cdmoe plugin loads the
condensed directory). Same prompts for both (token windows of the demo text, or random
ids with --random-prompts), one ``generate`` call of ``--batch`` prompts x
``--new-tokens`` greedy tokens (EOS ignored) after one warm-up call, repeated
``--repeats`` times; the median output tokens/s is reported, with the weight memory
(checkpoint tensors at the serving dtype) and the KV-cache blocks vLLM allocated
(same ``VLLM_CPU_KVCACHE_SPACE`` for both, so the block count differs only through the
per-token KV size, which condensing does not change). Ratio = model / original.
Quantised checkpoints (compressed-tensors) count their codes and scales at their stored size.

Other processes on the machine ruin CPU numbers (vLLM-CPU pins one OpenMP thread per core, so a
process that takes a core stalls its parallel regions: an explanation, not profiled). On this 2-core
machine one busy loop (``python3 -c 'while True: pass' &`` before the DeepSeek-V2 command below) cut
the pair from 164.6 / 216.0 to 60.2 / 70.8 tok/s (float32, eager); other jobs, more. So each timed call
also records the CPU that *other* processes used meanwhile (system-wide busy time minus this process
tree's, in cores); the median is taken over the calls that saw at most ``--max-others`` cores, and a
model none of whose calls did is flagged CONTENDED, its tok/s not to be quoted: rerun on an idle
machine, or with more ``--repeats`` (``flock`` against your own jobs does not keep others' off).

A random DeepSeek-V2-style model with 32 routed experts (MLA off) and its ``cdmoe condense`` output,
one command each (benchmarks/make_random_moe.py; other families: qwen2_moe:32, qwen3_moe:32, ...):

    .venv/bin/python benchmarks/make_random_moe.py deepseek_v2:32 --out runs/bench-dsv2-e32
    VLLM_MLA_DISABLE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python benchmarks/vllm_throughput.py \
        runs/bench-dsv2-e32/original runs/bench-dsv2-e32/condensed --dtype float32 --eager --random-prompts \
        --batch 8 --new-tokens 32 --repeats 5
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


_FLOATS = {"F16", "BF16", "F32", "F64"}
_STORED_BYTES = {"F64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1,
                 "F8_E5M2": 1, "BOOL": 1}


def weight_bytes(model_dir: Path, dtype: str) -> int:
    """Bytes of the checkpoint's tensors at the serving dtype (from the safetensors headers); a quantised
    checkpoint's integer / float8 codes and its ``*_scale`` tensors at their stored size (vLLM keeps them).
    Not measured in the worker: vLLM-CPU repacks linear and fused-MoE weights after loading,
    so the torch parameters there undercount."""
    import torch

    itemsize = getattr(torch, dtype).itemsize
    total = 0
    for shard in sorted(model_dir.glob("*.safetensors")):
        with open(shard, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, t in header.items():
            if name == "__metadata__":
                continue
            served = t["dtype"] in _FLOATS and not name.endswith(("_scale", "_scale_inv", "_zero_point"))
            total += math.prod(t["shape"]) * (itemsize if served else _STORED_BYTES[t["dtype"]])
    return total


def prompts(model_dir: Path, n: int, length: int, random_ids: bool) -> list[list[int]]:
    tok_file = model_dir / "tokenizer.json"
    if random_ids or not tok_file.exists():
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        rng = random.Random(0)
        return [[rng.randrange(1, vocab) for _ in range(length)] for _ in range(n)]
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tok_file)).encode(gzip.open(ROOT / "demo/data/test.txt.gz", "rt").read(200_000)).ids
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def _cpu_seconds(process) -> float:
    """User + system CPU seconds of a psutil process (0 if it has ended)."""
    import psutil

    try:
        times = process.cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


def others_cores(run):
    """``(run(), cores that processes outside this process tree kept busy during it)``: system-wide
    busy CPU time (steal included) minus this process's and its children's, over the wall time."""
    import psutil

    def busy() -> tuple[float, float]:
        t = psutil.cpu_times()
        system = sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        me = psutil.Process()
        return system, sum(_cpu_seconds(p) for p in [me, *me.children(recursive=True)])

    (system0, own0), start = busy(), time.perf_counter()
    result = run()
    (system1, own1), elapsed = busy(), time.perf_counter() - start
    return result, max(0.0, (system1 - system0) - (own1 - own0)) / elapsed


def print_profile(model_dir: Path, run, rows: int) -> None:
    """torch.profiler's ``rows`` operators of most self CPU time over ``run()`` (vLLM in this process:
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0``; otherwise the engine's work is not seen)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    print(f"profile of one more call, {model_dir}:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=50))


def measure(model_dir: Path, batch: list[list[int]], new_tokens: int, repeats: int, dtype: str, extra: dict,
            max_others: float = 0.1, profile_rows: int = 0) -> dict:
    from cdmoe_vllm.config import original_overrides
    from cdmoe_vllm.tied import servable_copy
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    scratch = tempfile.TemporaryDirectory()
    served = servable_copy(model_dir, Path(scratch.name) / "model")
    llm = LLM(model=str(served), dtype=dtype, seed=0, skip_tokenizer_init=True,
              max_model_len=min(1024, json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]),
              hf_overrides=original_overrides(served) or None, **extra)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    inputs = [TokensPrompt(prompt_token_ids=p) for p in batch]
    llm.generate(inputs, params, use_tqdm=False)  # warm-up
    rates, others = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        outs, busy = others_cores(lambda: llm.generate(inputs, params, use_tqdm=False))
        elapsed = time.perf_counter() - start
        rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / elapsed)
        others.append(busy)
    clean = [rate for rate, busy in zip(rates, others) if busy <= max_others]
    if profile_rows:
        print_profile(model_dir, lambda: llm.generate(inputs, params, use_tqdm=False), profile_rows)
    result = {
        "output_tokens_per_s": statistics.median(clean or rates),
        "uncontended_runs": len(clean),
        "runs": rates,
        "others_cores": others,
        "weight_bytes": weight_bytes(model_dir, dtype),
        "kv_cache_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
    }
    llm.llm_engine.engine_core.shutdown()
    scratch.cleanup()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("original", type=Path)
    ap.add_argument("condensed", type=Path)
    ap.add_argument("--also", action="append", default=[], metavar="NAME=DIR",
                    help="another model to measure in the same run (e.g. w8a8=runs/demo-w8a8); repeatable")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--random-prompts", action="store_true")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile)")
    ap.add_argument("--max-others", type=float, default=0.1,
                    help="flag a model whose timed calls saw other processes use more CPU cores than this")
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS",
                    help="after the timed calls, print the top ROWS operators of one more call per model")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    from cdmoe_vllm.engine import engine_kwargs  # vLLM-CPU workarounds, for both models alike

    extra = engine_kwargs(enforce_eager=args.eager)
    batch = prompts(args.original, args.batch, args.prompt_len, args.random_prompts)
    models = {"original": args.original, "condensed": args.condensed}
    for item in args.also:
        name, _, path = item.partition("=")
        if not path:
            ap.error(f"--also takes NAME=DIR, got {item!r}")
        models[name] = Path(path)
    res = {name: measure(path, batch, args.new_tokens, args.repeats, args.dtype, extra, args.max_others, args.profile)
           for name, path in models.items()}
    o = res["original"]
    print(f"batch {args.batch} x {args.new_tokens} new tokens, {args.dtype}, median of the {args.repeats} timed calls"
          f" (of those where other processes used <= {args.max_others} cores, if any)")
    for name, r in res.items():
        print(f"{name:>16}: {r['output_tokens_per_s']:8.1f} output tok/s  weights {r['weight_bytes'] / 2**20:8.1f} MiB"
              f"  KV-cache blocks {r['kv_cache_blocks']}  ratio {r['output_tokens_per_s'] / o['output_tokens_per_s']:.3f}x"
              f" throughput, {r['weight_bytes'] / o['weight_bytes']:.3f}x weight memory"
              f"  {r['uncontended_runs']}/{args.repeats} calls uncontended")
    contended = [name for name, r in res.items() if not r["uncontended_runs"]]
    if contended:
        print(f"CONTENDED: other processes used > {args.max_others} cores during every timed call of "
              f"{', '.join(contended)}; these tok/s are not comparable: rerun on an idle machine")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **res}, indent=1))


if __name__ == "__main__":
    main()
