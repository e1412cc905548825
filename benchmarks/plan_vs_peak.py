"""``cdmoe plan``'s predicted peak memory vs the measured peak RSS of the ``cdmoe condense`` it plans.

    python benchmarks/plan_vs_peak.py                                  # Qwen1.5-MoE-A2.7B widths, 2 layers, sequential
    python benchmarks/plan_vs_peak.py --modes sequential,whole --keep runs/plan-vs-peak
    python benchmarks/plan_vs_peak.py --quantize w8a8 --keep runs/plan-vs-peak   # written quantised, layer by layer

Builds a random model with a real config's widths (``--config``, default Qwen1.5-MoE-A2.7B: hidden
2048, 60 experts of width 1408, a 5632-wide shared expert, 151,936-token vocabulary) cut to
``--layers`` decoder layers, in bf16 with the demo tokenizer (``benchmarks/random_family_model.py``).
For each mode, in fresh Python processes: ``cdmoe plan MODEL --json`` with the options of the run
(predicted ``peak_host_bytes``, imports included), then the CPU condense itself, whose peak resident
memory is sampled (``ru_maxrss``, the process's high-water mark, imports included). Prints
measured / predicted per mode (the target is [0.6, 1.15]) and the predicted phases.

The run computes in fp32 on the CPU (``--dtype auto``), so the 3.3 GiB bf16 checkpoint (2 layers)
is 6.6 GiB of weights: sequential mode holds the 2.3 GiB of embeddings and lm_head and one 2.1 GiB
decoder layer. Needs several GB of RAM (whole mode ~11 GiB): run one at a time.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

_CHILD = r"""
import json, resource, sys
from cdmoe.methods.condense import condense
from cdmoe.search.calibration import CalibSpec
from cdmoe.search.run import SearchOptions
model, out, mode, calib, samples, seq_len, layers, batch, quantize = sys.argv[1:10]
record = condense(model, out, SearchOptions(layers=int(layers), batch_size=int(batch)),
                  CalibSpec(calib, samples=int(samples), seq_len=int(seq_len)), show_progress=False, mode=mode,
                  force=True, activations="memory", quantize=quantize or None)
print(json.dumps({"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "plan": record["search"]["memory_plan"], "seconds": record["search"]["timings"]["total_s"]}))
"""


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
            "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def build(path: Path, config: Path, layers: int) -> None:
    from random_family_model import random_model

    random_model(config, layers).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(ROOT / "demo/model" / name, path / name)


def predicted(model: Path, mode: str, args) -> dict:
    cmd = [sys.executable, "-m", "cdmoe", "plan", str(model), "--layers", str(args.condense), "--samples",
           str(args.samples), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--mode", mode,
           "--activations", "memory", "--json"] + (["--quantize", args.quantize] if args.quantize else [])
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if done.returncode:
        sys.exit(f"cdmoe plan failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def measured(model: Path, out: Path, mode: str, args) -> dict:
    cmd = [sys.executable, "-c", _CHILD, str(model), str(out), mode, args.calib, str(args.samples), str(args.seq_len),
           str(args.condense), str(args.batch_size), args.quantize or ""]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if done.returncode:
        sys.exit(f"{mode} condense failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "tests/fixtures/configs/Qwen__Qwen1.5-MoE-A2.7B.json")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the random model")
    ap.add_argument("--modes", default="sequential", help="comma-separated: sequential, whole")
    ap.add_argument("--calib", default=str(ROOT / "demo/data/valid.txt.gz"))
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--condense", type=int, default=1, help="N: MoE layers to condense")
    ap.add_argument("--keep", type=Path, default=None, help="keep the model and outputs here (and reuse the model)")
    ap.add_argument("--quantize", default=None, help="write the output quantised (e.g. w8a8: compressed-tensors)")
    args = ap.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="cdmoe-plan-peak-"))
    model = work / "model"
    if not (model / "config.json").exists():
        build(model, args.config, args.layers)
    gib = 2**30
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    print(f"model: {args.config.name} widths, {args.layers} decoder layers, {size / gib:.2f} GiB on disk (bf16); "
          f"calibration {args.samples} x {args.seq_len} tokens, N = {args.condense}, CPU, fp32 compute"
          + (f", --quantize {args.quantize}" if args.quantize else ""))
    for mode in args.modes.split(","):
        plan = predicted(model, mode, args)
        run = measured(model, work / f"out-{mode}", mode, args)
        ratio = run["peak_bytes"] / plan["peak_host_bytes"]
        print(f"{mode:>10}: measured peak RSS {run['peak_bytes'] / gib:6.2f} GiB, cdmoe plan predicted "
              f"{plan['peak_host_bytes'] / gib:6.2f} GiB (condense's own estimate "
              f"{run['plan']['peak_host_bytes'] / gib:.2f} GiB): measured / predicted = {ratio:.3f}  "
              f"({run['seconds']:.0f} s)")
        for name, phase in plan["phases"].items():
            print(f"            {name:>28}: {(phase['device_bytes'] + phase['host_bytes']) / gib:6.2f} GiB "
                  "(+ imports)")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
