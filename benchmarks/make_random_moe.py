"""A random MoE of a real family at serving-benchmark sizes, and its copy condensed by the real ``cdmoe condense``.

    .venv/bin/python benchmarks/make_random_moe.py deepseek_v2:32 --out runs/bench-dsv2-e32
    VLLM_MLA_DISABLE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python benchmarks/vllm_throughput.py \
        runs/bench-dsv2-e32/original runs/bench-dsv2-e32/condensed --dtype float32 --eager --random-prompts \
        --batch 8 --new-tokens 32 --repeats 5

``FAMILY:E`` picks a real config (``FAMILY``: a key of :data:`CONFIGS`) and its routed expert count
E. The config keeps its structure (routing switches, shared experts, dense-layer rule: what
:func:`cdmoe.models.testing.shrink_config` keeps) at the widths of :data:`SIZES` (hidden 768, experts
384 wide, top-k of the real config) with ``--layers`` decoder layers: big enough that matrix products,
not Python, take the time of a decode step on a CPU, small enough to build, condense and serve in
about a minute each on 2 cores. Weights are :func:`cdmoe.models.testing.randomize_`'s (seeded);
the demo model's tokenizer is copied in (4096 ids < the vocabulary) so that ``cdmoe condense`` runs
exactly as a user would run it (search on the demo validation text, ``--condense`` layers, ``--experts``
K). Writes ``OUT/original`` and ``OUT/condensed``. Speed and memory only: never use them for quality.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from cdmoe.models.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]
_CONFIGS = ROOT / "tests/fixtures/configs"
CONFIGS = {
    "deepseek_v2": _CONFIGS / "deepseek-ai__DeepSeek-V2-Lite.json",
    "deepseek_v3": _CONFIGS / "deepseek-ai__DeepSeek-V3.json",
    "deepseek": _CONFIGS / "deepseek-ai__deepseek-moe-16b-base.json",
    "qwen2_moe": _CONFIGS / "Qwen__Qwen1.5-MoE-A2.7B.json",
    "qwen3_moe": _CONFIGS / "Qwen__Qwen3-30B-A3B.json",
    "mixtral": _CONFIGS / "mistralai__Mixtral-8x7B-v0.1.json",
    "olmoe": _CONFIGS / "allenai__OLMoE-1B-7B-0924.json",
}
# benchmark widths, applied to the keys the real config has (the expert width goes to
# moe_intermediate_size, or to intermediate_size where that is the experts' width: Mixtral, OLMoE)
SIZES = {"hidden_size": 768, "num_attention_heads": 12, "head_dim": 64, "shared_expert_intermediate_size": 1536,
         "kv_lora_rank": 256, "qk_rope_head_dim": 32, "qk_nope_head_dim": 64, "v_head_dim": 64,
         "vocab_size": 32000, "max_position_embeddings": 2048}
EXPERT_WIDTH, DENSE_WIDTH = 384, 2048
DEMO = ROOT / "demo"


def random_config(family: str, experts: int, layers: int) -> tuple[Path, dict]:
    """The real config of ``family`` and the overrides of :func:`tiny_model` for the benchmark model."""
    real = json.loads(CONFIGS[family].read_text())
    sizes = {k: v for k, v in SIZES.items() if k in real}
    if "moe_intermediate_size" in real:
        sizes.update(moe_intermediate_size=EXPERT_WIDTH, intermediate_size=DENSE_WIDTH)
    else:
        sizes["intermediate_size"] = EXPERT_WIDTH
    if real.get("q_lora_rank"):
        sizes["q_lora_rank"] = EXPERT_WIDTH
    mha = real["num_key_value_heads"] == real["num_attention_heads"]
    sizes["num_key_value_heads"] = SIZES["num_attention_heads"] if mha else SIZES["num_attention_heads"] // 3
    count_key = next(k for k in ("n_routed_experts", "num_experts", "num_local_experts") if k in real)
    top_k = min(real["num_experts_per_tok"], experts)
    return CONFIGS[family], {**sizes, count_key: experts, "num_experts_per_tok": top_k, "num_hidden_layers": layers,
                             "max_window_layers": layers, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", help="FAMILY:E, e.g. deepseek_v2:32 (families: " + ", ".join(CONFIGS) + ")")
    ap.add_argument("--layers", type=int, default=6, help="decoder layers")
    ap.add_argument("--condense", type=int, default=3, help="N: MoE layers cdmoe condense condenses")
    ap.add_argument("--experts", type=int, default=4, help="K routed experts per condensed layer")
    ap.add_argument("--dtype", default="float32", help="stored dtype of the random weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    family, _, count = args.spec.partition(":")
    if family not in CONFIGS or not count.isdigit():
        ap.error(f"spec must be FAMILY:E with FAMILY one of {', '.join(CONFIGS)}, got {args.spec!r}")
    if args.out.exists():
        ap.error(f"{args.out} exists; pass a new --out")
    config, overrides = random_config(family, int(count), args.layers)
    model = tiny_model(config, seed=args.seed, dtype=getattr(torch, args.dtype), **overrides)
    original = args.out / "original"
    model.save_pretrained(original)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / "model" / name, original / name)
    print(f"wrote {original}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters", flush=True)
    del model
    subprocess.run([sys.executable, "-m", "cdmoe", "condense", str(original), "--out", str(args.out / "condensed"),
                    "--layers", str(args.condense), "--experts", str(args.experts), "--calib",
                    str(DEMO / "data/valid.txt.gz"), "--samples", "16", "--seq-len", "128", "--seed", str(args.seed)],
                   check=True)


if __name__ == "__main__":
    main()
