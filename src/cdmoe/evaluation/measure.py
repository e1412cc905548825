"""Measured (not computed) memory of a checkpoint: bytes on disk and peak resident memory.

Peak RSS is measured in a fresh Python process per model (so one model's peak cannot hide
another's): the process imports torch and transformers, records its RSS, loads the model,
runs one forward pass on ``batch x seq_len`` tokens, and reports the peak RSS above the
post-import RSS. On Linux the peak (``VmHWM``) is reset to the current RSS after the imports
(``/proc/self/clear_refs``), so a transient peak during the imports cannot hide the load's;
elsewhere ``ru_maxrss`` is used, which can under-report small models. Memory the allocator
already holds from the imports is reused without growing RSS, so for models of a few MiB
the numbers are dominated by that slack; they are meaningful from tens of MiB up.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from ..errors import CdmoeError

__all__ = ["disk_bytes", "peak_rss", "measure_memory"]

_SCRIPT = r"""
import json, resource, sys
import torch, transformers
try:
    import cdmoe  # registers condensed checkpoints when available
except ImportError:
    pass
def status_kib(field):  # VmHWM: peak RSS, VmRSS: current RSS (Linux); ru_maxrss (the peak) elsewhere
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
def rss_kib():
    return status_kib("VmHWM")
path, dtype, batch, seq, trust, device = (sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                                          sys.argv[5] == "1", sys.argv[6])
gpu = device.startswith("cuda")
if gpu:
    torch.cuda.init()  # the CUDA context's host memory counts in the baseline, not in the model's load
else:
    torch.set_num_threads(2)
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
except OSError:
    pass
base = status_kib("VmRSS")
model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype == "auto" else getattr(torch, dtype), trust_remote_code=trust, **({"device_map": {"": device}} if gpu else {})).eval()
loaded = rss_kib()
device_loaded = torch.cuda.max_memory_allocated(device) if gpu else 0
with torch.no_grad():
    model(input_ids=torch.randint(0, model.config.vocab_size, (batch, seq), device=device))
ran = rss_kib()
device_ran = torch.cuda.max_memory_allocated(device) if gpu else 0
print(json.dumps({"baseline_kib": base, "after_load_kib": loaded, "after_forward_kib": ran,
                  "device_load_bytes": device_loaded, "device_load_and_run_bytes": device_ran}))
"""


def disk_bytes(directory: str | Path) -> int:
    """Bytes of the weight files (safetensors, or bin) of a checkpoint directory."""
    directory = Path(directory)
    files = list(directory.glob("*.safetensors")) or list(directory.glob("*.bin"))
    if not files:
        raise CdmoeError(f"{directory} has no weight files")
    return sum(f.stat().st_size for f in files)


def peak_rss(directory: str | Path, dtype: str = "float32", batch: int = 1, seq_len: int = 128,
             device: str = "cpu") -> dict:
    """Peak resident memory (bytes) above the import baseline, loading then running the model; on a GPU
    (``device`` cuda or cuda:N, the weights loaded straight onto it) also the GPU's peak allocated bytes.

    ``dtype`` is a torch dtype name or ``auto`` (the checkpoint's own).
    """
    from ..models.placement import resolve_device

    device = str(resolve_device(device))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    from ..io.remote_code import trusted

    if not Path(directory).is_dir():
        raise CdmoeError(f"{directory} does not exist or is not a directory; pass a local model directory")
    run = subprocess.run([sys.executable, "-c", _SCRIPT, str(directory), dtype, str(batch), str(seq_len),
                          "1" if trusted() else "0", device], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise CdmoeError(f"measuring {directory} failed: {run.stderr.strip().splitlines()[-1]}")
    data = json.loads(run.stdout.strip().splitlines()[-1])
    result = {"load_bytes": 1024 * (data["after_load_kib"] - data["baseline_kib"]),
              "load_and_run_bytes": 1024 * (data["after_forward_kib"] - data["baseline_kib"])}
    if device.startswith("cuda"):
        result.update(device_load_bytes=data["device_load_bytes"], device_load_and_run_bytes=data["device_load_and_run_bytes"])
    return result


def measure_memory(original: str | Path, condensed: str | Path, dtype: str = "float32", repeats: int = 3,
                   device: str = "cpu") -> dict:
    """Disk bytes and peak RSS (and, on a GPU, peak GPU memory) of both checkpoints, and their ratios
    (condensed / original).

    Peak RSS is the median of ``repeats`` fresh processes per checkpoint, alternating between
    the two (it varies by several MiB from run to run).
    """
    runs: dict[str, list[dict]] = {"original": [], "condensed": []}
    for _ in range(repeats):
        for name, path in (("original", original), ("condensed", condensed)):
            runs[name].append(peak_rss(path, dtype, device=device))
    out: dict = {"repeats": repeats, "device": device}
    for name, path in (("original", original), ("condensed", condensed)):
        out[name] = {"disk_bytes": disk_bytes(path),
                     **{key: statistics.median(r[key] for r in runs[name]) for key in runs[name][0]}}
    out["ratios"] = {key: out["condensed"][key] / out["original"][key] for key in out["original"]}
    return out
