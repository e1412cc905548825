"""Peak resident memory of ``cdmoe condense``: sequential mode (activations in memory or on disk) vs whole.

    python benchmarks/peak_memory.py                     # ~0.9 GB fp32 random deepseek_v2, 10 layers
    python benchmarks/peak_memory.py --layers 12 --experts 48

Builds a random DeepSeek-V2-style MoE (``cdmoe.models.testing.tiny_model`` at larger sizes, fp32,
saved by transformers with per-expert keys in shards smaller than one decoder layer), then
condenses it three times, each in a fresh Python process (``--mode whole``, ``--mode sequential``
and ``--mode sequential --activations disk``, same calibration and options), and prints for each
the peak RSS (``ru_maxrss``) above the process's resident memory right after importing
torch/transformers/cdmoe (psutil), the ratios, whether the selections and the saved tensors are identical, and the bound expected for
sequential mode (T calibration tokens, H hidden size, E routed experts, all fp32):

    largest decoder layer x 2 (transformers' conversion stacks the per-expert tensors: the
    list and the fused copy exist together) + non-layer weights + layer-input cache
    (MoE layers x T x H) + Algorithm 1's working set, the same in both modes (expert outputs as a
    list and stacked: 2 x E x T x H; block input/output/layer output 3 x T x H; scoring in
    token chunks: about 6 live (candidates x chunk x H) temporaries, chunk <= 256 MiB)
    + Algorithm 2's candidate streams (one T x H set per MoE layer)

and with ``--activations disk`` the same without the cache and the streams (they are files).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, resource, sys, warnings
warnings.filterwarnings("ignore")
import torch, transformers
import cdmoe
from cdmoe.search.calibration import CalibSpec
from cdmoe.methods.condense import condense
from cdmoe.search.run import SearchOptions
torch.set_num_threads(1)
import psutil
model, out, mode, activations, calib, samples, seq_len, layers = sys.argv[1:9]
base = psutil.Process().memory_info().rss // 1024  # now, not the import high-water mark
record = condense(model, out, SearchOptions(layers=int(layers), batch_size=8),
                  CalibSpec(calib, samples=int(samples), seq_len=int(seq_len)), show_progress=False, mode=mode,
                  force=True, activations=activations)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"baseline_kib": base, "peak_kib": peak, "condensed": record["condensed"],
                  "layer_order": record["search"]["layer_order"], "seconds": record["search"]["timings"]["total_s"]}))
"""


def build(path: Path, layers: int, experts: int, hidden: int, inter: int) -> None:
    """A random deepseek_v2 checkpoint with the demo model's tokenizer, in 32 MB shards."""
    from cdmoe.models.testing import tiny_model

    model = tiny_model(ROOT / "tests/fixtures/configs/deepseek-ai__DeepSeek-V2-Lite.json", seed=0,
                       num_hidden_layers=layers, hidden_size=hidden, n_routed_experts=experts, moe_intermediate_size=inter,
                       intermediate_size=4 * inter, n_shared_experts=2, num_experts_per_tok=4, vocab_size=4096,
                       num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=128, qk_rope_head_dim=32,
                       qk_nope_head_dim=32, v_head_dim=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model.save_pretrained(path, max_shard_size="32MB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(ROOT / "demo/model" / name, path / name)


def layer_sizes(path: Path) -> tuple[int, int, int, int]:
    """(largest decoder layer bytes, non-layer bytes, decoder layers, hidden size) from the shard headers."""
    from safetensors import safe_open

    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    per_layer: dict[int, int] = {}
    rest = 0
    for name, file in index.items():
        with safe_open(path / file, "pt") as f:
            t = f.get_slice(name)
            size = 4
            for d in t.get_shape():
                size *= d
        if name.startswith("model.layers."):
            idx = int(name.split(".")[2])
            per_layer[idx] = per_layer.get(idx, 0) + size
        else:
            rest += size
    config = json.loads((path / "config.json").read_text())
    return max(per_layer.values()), rest, len(per_layer), config["hidden_size"]


RUNS = {"whole": ("whole", "memory"), "sequential": ("sequential", "memory"), "seq+disk": ("sequential", "disk")}


def run(model: Path, out: Path, name: str, args) -> dict:
    mode, activations = RUNS[name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-c", _CHILD, str(model), str(out), mode, activations, args.calib, str(args.samples),
           str(args.seq_len), str(args.condense)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{name} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    def load(d):
        out = {}
        for f in d.glob("*.safetensors"):
            out.update(load_file(f))
        return out

    x, y = load(a), load(b)
    return x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=10, help="decoder layers of the random model")
    ap.add_argument("--experts", type=int, default=32, help="routed experts per layer")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=384, help="expert intermediate size")
    ap.add_argument("--calib", default=str(ROOT / "demo/data/valid.txt.gz"))
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--condense", type=int, default=2, help="N: MoE layers to condense")
    ap.add_argument("--keep", type=Path, default=None, help="keep the model and outputs here")
    args = ap.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="cdmoe-peak-"))
    model = work / "model"
    if not (model / "config.json").exists():
        build(model, args.layers, args.experts, args.hidden, args.inter)
    largest, rest, n_layers, hidden = layer_sizes(model)
    total = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    tokens = args.samples * args.seq_len
    cache = (n_layers - 1) * tokens * hidden * 4  # inputs of the MoE layers (layer 0 is dense)
    scoring = min(256 * 2**20, args.experts * tokens * hidden * 4)  # expert_search._token_chunk's budget
    alg1 = (2 * args.experts + 3) * tokens * hidden * 4 + 6 * scoring
    streams = (n_layers - 1) * tokens * hidden * 4  # layer 0 is dense (first_k_dense_replace = 1)
    bound = 2 * largest + rest + cache + alg1 + streams
    results = {name: run(model, work / f"out-{name}", name, args) for name in RUNS}
    peak = {m: 1024 * (r["peak_kib"] - r["baseline_kib"]) for m, r in results.items()}
    mib = 2**20
    print(f"model: {n_layers} decoder layers, {total / mib:.0f} MiB fp32 on disk, largest layer {largest / mib:.1f} MiB "
          f"({total / largest:.1f}x smaller than the model), non-layer weights {rest / mib:.1f} MiB")
    print(f"calibration: {tokens} tokens; layer-input cache {cache / mib:.1f} MiB, Algorithm 1 working set "
          f"{alg1 / mib:.1f} MiB, Algorithm 2 candidate streams {streams / mib:.1f} MiB")
    baseline = results["sequential"]["baseline_kib"] / 1024
    for name in RUNS:
        print(f"{name:>10}: peak RSS above baseline {peak[name] / mib:8.1f} MiB   ({results[name]['seconds']:.1f} s)")
    print(f"     ratio: sequential / whole = {peak['sequential'] / peak['whole']:.3f}, "
          f"sequential --activations disk / whole = {peak['seq+disk'] / peak['whole']:.3f}")
    print(f"     bound: sequential expected ~ 2 x layer + non-layer + cache + Alg. 1 + Alg. 2 = {bound / mib:.1f} MiB "
          f"(+ {baseline:.0f} MiB baseline of python + torch + transformers + cdmoe, measured)")
    print(f"            seq+disk expected ~ the same without cache and streams = {(bound - cache - streams) / mib:.1f} MiB")
    whole_expected = total + cache + alg1  # whole mode holds every layer instead of two copies of one
    print(f"            whole expected ~ model + the same activations = {whole_expected / mib:.1f} MiB")
    same = all(results["whole"]["condensed"] == r["condensed"] and results["whole"]["layer_order"] == r["layer_order"]
               for r in results.values())
    tensors = all(same_tensors(work / "out-whole", work / f"out-{name}") for name in RUNS if name != "whole")
    print(f"selections identical: {same} (layers {results['whole']['layer_order']}); saved tensors identical: {tensors}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
