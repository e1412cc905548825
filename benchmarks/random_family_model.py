"""A random-weight model with a real family's shapes, and a condensed copy, for speed benchmarks only.

    .venv/bin/python benchmarks/random_family_model.py tests/fixtures/configs/Qwen__Qwen1.5-MoE-A2.7B.json \
        --layers 4 --condense 1,3 --experts 4 --out runs/bench-qwen1.5-moe
    # then, with the vLLM venv:
    .venv-vllm/bin/python benchmarks/vllm_throughput.py runs/bench-qwen1.5-moe/original \
        runs/bench-qwen1.5-moe/condensed --random-prompts

Every size of the config (hidden size, experts and their width, shared experts, vocabulary, heads)
is kept; only the decoder is cut to ``--layers`` layers, so the MoE layers, not Python overhead,
dominate the time and the model fits this machine. Weights are PyTorch's default random init
(seeded) in ``--dtype``. The condensed copy replaces the ``--condense`` layers by CD-MoE's dense
layer (Eq. 3) with ``--experts`` routed experts drawn at random and equal gates 1/K: the search is
not run, since speed and memory depend on the shapes alone. Never use these models for quality.
Writes ``OUT/original`` (the family's own format) and ``OUT/condensed`` (cdmoe's).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from cdmoe.checkpoint.record import condense_layers
from cdmoe.models.adapter import config_value, family_spec
from cdmoe.models.condensed import LayerChoice


def random_model(config: Path, layers: int, dtype: str = "bfloat16", seed: int = 0):
    """A model of ``config``'s family and sizes with ``layers`` decoder layers and random weights (seeded)."""
    data = json.loads(config.read_text())
    data = {k: v for k, v in data.items() if k not in ("auto_map", "architectures", "quantization_config")}
    data["num_hidden_layers"] = layers
    cfg = AutoConfig.for_model(data.pop("model_type"), **data)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype)).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path, help="a real config.json (tests/fixtures/configs/)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers kept")
    ap.add_argument("--condense", default="1,3", help="comma-separated layer indices to condense")
    ap.add_argument("--experts", type=int, default=4, help="K routed experts per condensed layer")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists; pass a new --out")
    model = random_model(args.config, args.layers, args.dtype, args.seed)
    cfg = model.config
    model.save_pretrained(args.out / "original")
    layers = [int(i) for i in args.condense.split(",")]
    num_experts = config_value(cfg, family_spec(model).num_experts_keys)
    rng = random.Random(args.seed)
    choices = [LayerChoice(layer=i, experts=tuple(sorted(rng.sample(range(num_experts), args.experts))),
                           gates=(1.0 / args.experts,) * args.experts) for i in layers]
    condense_layers(model, choices)
    model.save_pretrained(args.out / "condensed")
    print(f"wrote {args.out}/original and {args.out}/condensed ({len(layers)} of {args.layers} layers condensed, "
          f"K = {args.experts}, random weights: for speed and memory only)")


if __name__ == "__main__":
    main()
