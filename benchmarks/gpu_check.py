"""Every GPU check of cdmoe in one run: condense (whole and sequential), fp32 GPU vs CPU, every command on
``--device cuda``, and measured peak memory against ``cdmoe plan``. Writes ``OUT/gpu_check.json`` and prints
a summary. Run it on a CUDA machine (``bash benchmarks/gpu_check.sh``); ``--device cpu --small`` runs the
same steps on tiny shapes, to check the script itself on a machine without a GPU.

    python benchmarks/gpu_check.py --out runs/gpu-check                  # on a GPU: real widths
    python benchmarks/gpu_check.py --out runs/gpu-check-cpu --device cpu --small

Steps (each a fresh process, timed, its peak GPU memory and peak RSS measured in that process):

1. a random model with Qwen1.5-MoE-A2.7B's widths (hidden 2048, 60 experts of 1408, shared 5632, vocabulary
   151,936), ``--layers`` decoder layers, bf16, with the demo tokenizer (its ids are all < 4096);
2. ``cdmoe plan --json`` for the runs below (predicted peak device and host bytes);
3. ``condense`` on the GPU in the checkpoint's bf16, ``--mode whole`` and ``--mode sequential``: same
   selections expected; peaks against the plan;
4. ``condense --dtype fp32`` on the GPU and on the CPU: the Algorithm 1 and 2 scores agree to 1e-4
   relative, so the selections are equal unless two candidates are within that of each other (a
   near-tie, which the JSON shows);
5. ``eval`` (perplexity), ``finetune`` (a few steps), ``apply``, ``baseline``, ``sweep``, ``compare`` and
   ``measure`` with ``--device cuda`` on the demo model or the condensed output: each must exit 0.

Random weights: for memory, speed and device handling only, never quality.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QWEN = ROOT / "tests" / "fixtures" / "configs" / "Qwen__Qwen1.5-MoE-A2.7B.json"
DEMO = ROOT / "demo" / "model"
CALIB = ROOT / "demo" / "data" / "valid.txt.gz"
TEXT = ROOT / "demo" / "data" / "test.txt.gz"

# runs cdmoe's CLI in this process and reports its own peaks (GPU: torch's allocator; host: VmHWM)
_CHILD = r"""
import json, resource, sys, time
import torch
from cdmoe.cli import app
start = time.perf_counter()
try:
    app(sys.argv[1:], standalone_mode=False)
    code = 0
except SystemExit as err:
    code = err.code or 0
peak_gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
print("CDMOE-CHECK " + json.dumps({"exit": code, "seconds": time.perf_counter() - start,
                                   "peak_device_bytes": peak_gpu, "peak_host_bytes": hwm}))
"""


def cdmoe(args: list[str], log: Path) -> dict:
    """Run ``cdmoe ARGS`` in a fresh process; its exit code, wall time and peaks."""
    env_path = f"{ROOT / 'src'}"
    run = subprocess.run([sys.executable, "-c", _CHILD, *map(str, args)], capture_output=True, text=True,
                         env={**_env(), "PYTHONPATH": env_path})
    log.write_text(f"$ cdmoe {' '.join(map(str, args))}\n{run.stdout}\n{run.stderr}")
    lines = [line for line in run.stdout.splitlines() if line.startswith("CDMOE-CHECK ")]
    result = json.loads(lines[-1].removeprefix("CDMOE-CHECK ")) if lines else {"exit": run.returncode}
    if result["exit"] != 0:
        tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
        result["error"] = " | ".join(tail)
    return result


def _env() -> dict:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def build_model(out: Path, layers: int, small: bool, device: str) -> Path:
    """The random real-width model (or a tiny one with ``small``), bf16, with the demo tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from cdmoe.models.testing import shrink_config

    data = json.loads(QWEN.read_text())
    data = shrink_config(data, vocab_size=4096) if small else {k: v for k, v in data.items() if k not in
                                                               ("auto_map", "architectures", "quantization_config")}
    data["num_hidden_layers"] = layers
    cfg = AutoConfig.for_model(data.pop("model_type"), **data)
    torch.manual_seed(0)
    with torch.device(device):  # default init on the GPU: seconds instead of minutes for 3B parameters
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    path = out / "model"
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(DEMO / name, path / name)
    del model
    return path


def plan(model: Path, mode: str, device: str, samples: int, seq_len: int, dtype: str, log: Path) -> dict:
    run = subprocess.run([sys.executable, "-m", "cdmoe", "plan", str(model), "--layers", "2", "--mode", mode,
                          "--device", device, "--samples", str(samples), "--seq-len", str(seq_len), "--dtype", dtype,
                          "--json"], capture_output=True, text=True, env={**_env(), "PYTHONPATH": str(ROOT / "src")})
    log.write_text(run.stdout + run.stderr)
    if run.returncode != 0:
        return {"exit": run.returncode, "error": " ".join((run.stderr or run.stdout).split())[-300:]}
    data = json.loads(run.stdout)
    return {"exit": 0, **{k: data.get(k) for k in ("peak_device_bytes", "peak_host_bytes", "disk_bytes", "mode")}}


def scores(record_dir: Path) -> dict:
    record = json.loads((record_dir / "cdmoe.json").read_text())
    search = record["search"]
    return {"layers": search["layer_order"], "layer_scores": search["layer_step_scores"],
            "experts": {k: v["experts"] for k, v in search["expert_search"].items()},
            "expert_scores": {k: v["step_scores"] for k, v in search["expert_search"].items()}}


def agreement(a: dict, b: dict) -> dict:
    """Selections equal? and the largest relative difference of the scores the two runs share."""
    pairs = list(zip(a["layer_scores"], b["layer_scores"]))
    for key in a["expert_scores"]:
        pairs += list(zip(a["expert_scores"][key], b["expert_scores"].get(key, [])))
    rel = max((abs(x - y) / max(abs(x), abs(y), 1e-30) for x, y in pairs), default=0.0)
    return {"same_layers": a["layers"] == b["layers"], "same_experts": a["experts"] == b["experts"],
            "max_relative_score_difference": rel}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--small", action="store_true", help="tiny shapes (a check of this script on a CPU)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch
    import transformers

    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    dev = args.device
    gpu = dev.startswith("cuda")
    report: dict = {"env": {"python": sys.version.split()[0], "torch": torch.__version__,
                            "transformers": transformers.__version__, "cuda": torch.version.cuda,
                            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                            if torch.cuda.is_available() else []},
                    "device": dev, "small": args.small, "steps": {}}
    steps = report["steps"]

    def save():
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")

    t0 = time.perf_counter()
    model = build_model(args.out, args.layers, args.small, dev if gpu else "cpu")
    steps["build_model"] = {"seconds": time.perf_counter() - t0, "path": str(model)}
    save()
    calib = ["--calib", CALIB, "--samples", args.samples, "--seq-len", args.seq_len, "--layers", 2, "--quiet"]
    runs = {}
    for name, extra, where in (("whole_bf16", ["--mode", "whole"], dev), ("sequential_bf16", ["--mode", "sequential"], dev),
                               ("whole_fp32", ["--mode", "whole", "--dtype", "fp32"], dev),
                               ("cpu_fp32", ["--mode", "whole", "--dtype", "fp32"], "cpu")):
        out = args.out / name
        shutil.rmtree(out, ignore_errors=True)
        dtype = "fp32" if "fp32" in name else "auto"
        mode = extra[1]
        steps[f"plan_{name}"] = plan(model, mode, where, args.samples, args.seq_len, dtype, logs / f"plan_{name}.log")
        steps[name] = cdmoe(["condense", model, "--out", out, "--device", where, *calib, *extra], logs / f"{name}.log")
        predicted = steps[f"plan_{name}"]
        for key in ("peak_device_bytes", "peak_host_bytes"):
            if predicted.get(key) and steps[name].get(key):
                steps[name][f"{key}_measured_over_predicted"] = steps[name][key] / predicted[key]
        if steps[name]["exit"] == 0:
            runs[name] = scores(out)
        save()
    if "whole_bf16" in runs and "sequential_bf16" in runs:
        steps["whole_vs_sequential_bf16"] = agreement(runs["whole_bf16"], runs["sequential_bf16"])
    if "whole_fp32" in runs and "cpu_fp32" in runs:
        steps["gpu_fp32_vs_cpu_fp32"] = agreement(runs["whole_fp32"], runs["cpu_fp32"])
    condensed = args.out / "whole_bf16"
    others = {
        "eval": ["eval", condensed, "--tasks", "none", "--ppl-text", TEXT, "--ppl-tokens", 4096,
                 "--ppl-seq-len", 256, "--out", args.out / "eval.json", "--force"],
        "finetune": ["finetune", condensed, "--data", TEXT, "--out", args.out / "finetuned", "--steps", 5,
                     "--batch-size", 4, "--seq-len", 128, "--force", "--quiet"],
        "baseline": ["baseline", "layer-drop", DEMO, "--out", args.out / "layer-drop", "--layers", 2, "--calib",
                     CALIB, "--samples", 8, "--seq-len", 64, "--force"],
        "sweep": ["sweep", DEMO, "--out", args.out / "sweep", "--layers", "1,2", "--calib", CALIB, "--samples", 8,
                  "--seq-len", 64, "--force"],
        "compare": ["compare", DEMO, "--out", args.out / "compare", "--budget", "0.8", "--methods",
                    "cd-moe,layer-drop", "--calib", CALIB, "--samples", 8, "--seq-len", 64, "--eval-text", TEXT,
                    "--eval-tokens", 4096, "--force"],
        "measure": ["measure", model, condensed, "--repeats", 1, "--dtype", "bfloat16", "--out",
                    args.out / "memory.json", "--force"],
    }
    for name, command in others.items():
        if name in ("eval", "finetune", "measure") and "whole_bf16" not in runs:
            steps[name] = {"exit": None, "skipped": "no condensed output"}
            continue
        steps[name] = cdmoe([*command, "--device", dev], logs / f"{name}.log")
        save()
    if steps.get("sweep", {}).get("exit") == 0:  # apply: replay the record of the sweep's first point
        steps["apply"] = cdmoe(["apply", DEMO, args.out / "sweep" / "layers-1", "--out", args.out / "applied",
                                "--force", "--device", dev], logs / "apply.log")
    save()
    print(json.dumps(report, indent=2))
    failed = [name for name, step in steps.items() if isinstance(step, dict) and step.get("exit") not in (0, None)]
    print(f"\nsteps that failed: {failed or 'none'}; wrote {args.out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
