"""Algorithm 1 at real widths: expert calls and time before and after shaping it for an accelerator, in one run.

    python benchmarks/expert_search_speed.py                       # Qwen1.5-MoE-A2.7B widths, 1024 tokens, K = 4
    python benchmarks/expert_search_speed.py --config tests/fixtures/configs/Qwen__Qwen3-30B-A3B.json

One MoE block with the config's real widths (random weights, fp32 on the CPU) and random calibration
inputs; the same greedy search three ways, checked to choose the same experts:

- before: the code this replaced (reproduced below as ``before_greedy``): token chunks from a fixed
  256 MiB for all candidates together, expert outputs recomputed every step (its 2 GiB fp32 cache is
  never met at real calibration sizes, 100 x 512 tokens: 25 GB for Qwen1.5, so it is off here too);
- after, no cache: ``greedy_experts`` with the CPU's 256 MiB for ONE candidate's chunk, no cache;
- after, cached: the same with every expert's output cached (what ``condense`` sizes from free memory).

Expert calls are counted by wrapping ``MoEBlock.expert_output``. Then, computed from the chunk rules
(not measured), the expert calls of a whole run at 100 x 512 tokens for real models, before and after
(after: 4 GiB of scoring memory, ``memory.fit.MAX_WORK`` on a GPU with room, no cache).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from cdmoe.memory.estimate import SearchMemory
from cdmoe.models.adapter import MoEBlock, family_spec
from cdmoe.search.expert_search import ExpertSearchResult, LayerActivations, fixed_gates, greedy_experts, token_chunk
from cdmoe.search.metrics import divergence_sum

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests/fixtures/configs"


@torch.no_grad()
def before_greedy(block, acts, gates, k, metric="js"):
    """Algorithm 1 as it was before (main at a1c9ddf, uncached path), for comparison only."""
    x, h = acts.x, acts.h.float()
    m = acts.residual_scale
    tokens, hidden = x.shape
    shared = block.shared_output(x)
    base = h - m * acts.y.float() + (m * shared.float() if shared is not None else 0.0)
    result = ExpertSearchResult(layer=block.layer_idx, experts=(), gates=())
    chosen: list[int] = []
    for _ in range(k):
        candidates = [e for e in range(block.num_experts) if e not in chosen]
        scale = (m * gates[candidates]).view(-1, 1, 1)
        scores = torch.zeros(len(candidates), dtype=torch.float64)
        step = max(1, 256 * 2**20 // (4 * len(candidates) * hidden))
        for start in range(0, tokens, step):
            sl = slice(start, start + step)
            cand_out = torch.stack([block.expert_output(e, x[sl]).float() for e in candidates])
            scores += divergence_sum(h[sl], base[sl].unsqueeze(0) + scale * cand_out, metric).double()
        best = candidates[int(torch.argmin(scores))]
        chosen.append(best)
        base = base + m * gates[best] * block.expert_output(best, x).float()
    result.experts = tuple(chosen)
    return result


def random_block(config: Path):
    """One MoE decoder layer of ``config``'s widths, random weights (std 0.02, seeded), fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    data = {k: v for k, v in json.loads(config.read_text()).items() if k not in ("auto_map", "quantization_config")}
    data.update(num_hidden_layers=1, first_k_dense_replace=0, mlp_only_layers=[])
    cfg = AutoConfig.for_model(data.pop("model_type"), **data)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)  # the config says bf16: fp32 here
    spec = family_spec(model)
    module = getattr(model.model.layers[0], spec.block_attr).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    for p in module.parameters():
        p.requires_grad_(False).copy_(torch.randn(p.shape, generator=gen) * 0.02)
    for name, buf in module.named_buffers():
        buf.zero_()
    return MoEBlock(0, module, spec, cfg), cfg


def run_calls(what, fn, block):
    calls = {"n": 0}
    original = block.expert_output

    def counted(e, x):
        calls["n"] += 1
        return original(e, x)

    block.expert_output = counted
    try:
        start = time.perf_counter()
        found = fn()
        return found, calls["n"], time.perf_counter() - start
    finally:
        block.expert_output = original


def old_calls(e: int, k: int, tokens: int, hidden: int) -> int:
    return sum((e - s) * math.ceil(tokens / max(1, 256 * 2**20 // (4 * (e - s) * hidden))) for s in range(k))


def new_calls(e: int, k: int, tokens: int, hidden: int, inter: int, work: int) -> int:
    return sum((e - s) * math.ceil(tokens / token_chunk(tokens, hidden, inter, work)) for s in range(k))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=CONFIGS / "Qwen__Qwen1.5-MoE-A2.7B.json")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=4, help="K routed experts to choose")
    args = ap.parse_args()
    torch.manual_seed(0)
    block, cfg = random_block(args.config)
    hidden = cfg.hidden_size
    x = torch.randn(args.tokens, hidden, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = block.module(x.unsqueeze(0))
    y = (y[0] if isinstance(y, tuple) else y).reshape(args.tokens, hidden)
    acts = LayerActivations(x=x, y=y, h=x + y)
    gates = fixed_gates(block, x)[0]
    full = block.num_experts * args.tokens * hidden * 4
    runs = {
        "before": lambda: before_greedy(block, acts, gates, args.experts),
        "after, no cache": lambda: greedy_experts(block, acts, gates, args.experts, memory=SearchMemory(cache_bytes=0)),
        "after, cached": lambda: greedy_experts(block, acts, gates, args.experts, memory=SearchMemory(cache_bytes=full)),
    }
    print(f"{args.config.name}: one MoE block, H = {hidden}, E = {block.num_experts}, expert width "
          f"{block.expert_weights(0)[0].shape[0]}; {args.tokens} tokens, K = {args.experts}, fp32, CPU, "
          f"{torch.get_num_threads()} threads")
    results = {name: run_calls(name, fn, block) for name, fn in runs.items()}
    _, calls0, time0 = results["before"]
    for name, (found, calls, seconds) in results.items():
        print(f"  {name:>16}: {calls:6d} expert calls, {seconds:7.1f} s   (before / this: calls {calls0 / calls:5.2f}x, "
              f"time {time0 / seconds:5.2f}x)   experts {found.experts}")
    same = len({found.experts for found, _, _ in results.values()}) == 1
    print(f"  same experts chosen: {same}")
    print("expert calls of a whole run at 100 x 512 tokens, computed from the chunk rules (K = top-k):")
    for name in ("deepseek-ai__DeepSeek-V3.json", "Qwen__Qwen3-30B-A3B.json", "Qwen__Qwen1.5-MoE-A2.7B.json"):
        c = json.loads((CONFIGS / name).read_text())
        e = c.get("n_routed_experts") or c.get("num_experts")
        k, h, inter = c["num_experts_per_tok"], c["hidden_size"], c["moe_intermediate_size"]
        layers = c["num_hidden_layers"] - (c.get("first_k_dense_replace") or 0)
        before, after = layers * old_calls(e, k, 51200, h), layers * new_calls(e, k, 51200, h, inter, 4 * 2**30)
        print(f"  {name.removesuffix('.json'):>30}: before {before:>13,}, after {after:>9,} ({before / after:.0f}x fewer)")


if __name__ == "__main__":
    main()
