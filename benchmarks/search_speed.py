"""Fast CD-MoE search vs the literal Algorithms 1 and 2, in one run, on the same calibration data.

    python benchmarks/search_speed.py                        # the shipped demo model
    python benchmarks/search_speed.py --model path/to/moe --samples 16 --seq-len 128

The naive reference (tests/naive_reference.py) evaluates every candidate with a full model
forward pass, as the paper's algorithms are written and the official code runs them. The
fast search computes each routed expert's output once per layer (Algorithm 1) and re-runs
only the layers from each candidate onward (Algorithm 2). Both must choose the same experts
and layers; the script prints both wall times, their ratio and the work each did.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from naive_reference import naive_experts, naive_layers  # noqa: E402

from cdmoe.models.adapter import moe_blocks  # noqa: E402
from cdmoe.models.condensed import fuse_condensed_mlp  # noqa: E402
from cdmoe.models.loading import load_model, load_tokenizer  # noqa: E402
from cdmoe.search.calibration import CalibSpec, load_calibration  # noqa: E402
from cdmoe.search.run import SearchOptions, run_search  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "demo" / "model"))
    ap.add_argument("--calib", default=str(ROOT / "demo" / "data" / "valid.txt.gz"))
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--experts", type=int, default=None, help="default: top-k")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    model = load_model(args.model)
    ids = load_calibration(load_tokenizer(args.model), CalibSpec(args.calib, args.samples, args.seq_len, seed=0))
    blocks = moe_blocks(model)
    k = blocks[0].top_k if args.experts is None else args.experts
    n_experts, n_layers = blocks[0].num_experts, len(model.model.layers)

    t0 = time.perf_counter()
    fast = run_search(model, ids, SearchOptions(layers=args.layers, experts=k, batch_size=8))
    t_fast = time.perf_counter() - t0

    t0 = time.perf_counter()
    naive_choice, condensed = {}, {}
    for block in blocks:
        gates = torch.tensor(fast.record["expert_search"][str(block.layer_idx)]["all_gates"])
        naive_choice[block.layer_idx] = naive_experts(model, ids, block.layer_idx, k, gates)
        chosen = naive_choice[block.layer_idx]
        condensed[block.layer_idx] = fuse_condensed_mlp(block, tuple(chosen), tuple(float(gates[e]) for e in chosen))
    naive_order = naive_layers(model, ids, condensed, args.layers)
    t_naive = time.perf_counter() - t0

    same_experts = all(fast.record["expert_search"][str(l)]["experts"] == e for l, e in naive_choice.items())
    same_layers = [c.layer for c in fast.choices] == naive_order
    alg1_naive = len(blocks) * sum(n_experts - i for i in range(k))
    alg2_naive = sum(len(blocks) - i for i in range(args.layers))
    cost = fast.record["cost"]
    print(f"model {args.model}: {len(blocks)} MoE layers x {n_experts} routed experts, K={k}, N={args.layers}, "
          f"calibration {args.samples} x {args.seq_len} tokens")
    print(f"naive (literal Alg. 1 + 2): {t_naive:8.2f} s  full model passes: {alg1_naive + alg2_naive + 1 + len(blocks)} "
          f"(Alg. 1: {alg1_naive} candidates, Alg. 2: {alg2_naive} candidates); "
          f"expert passes over all tokens: {sum((i + 1) * (n_experts - i) for i in range(k)) * len(blocks)} in the "
          f"condensed layers alone")
    print(f"fast  (cdmoe):              {t_fast:8.2f} s  expert passes over all tokens: {cost['expert_forward_passes']}; "
          f"decoder-layer passes: {cost['decoder_layer_passes']} (= {cost['decoder_layer_passes'] / n_layers:.1f} "
          f"model passes) + 1 model pass to cache layer inputs")
    print(f"speed-up (naive / fast wall time): {t_naive / t_fast:.1f}x")
    print(f"same experts: {same_experts}; same layers: {same_layers} (fast {[c.layer for c in fast.choices]}, "
          f"naive {naive_order})")


if __name__ == "__main__":
    main()
