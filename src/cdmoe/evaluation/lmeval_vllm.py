"""``cdmoe eval --backend vllm``: lm-evaluation-harness's ``vllm`` model type, in the vLLM venv.

vLLM pins an older transformers than cdmoe needs, so it lives in its own virtualenv
(``scripts/setup_vllm.sh``: vLLM, lm-eval and the cdmoe plugin ``plugins/vllm``). cdmoe
builds the task files here (the demo tasks too), writes a job file, runs
``<vllm python> -m cdmoe_vllm.lmeval_job job.json out.json`` (vLLM's log goes to this
process's stderr) and reads back lm-eval's results, the same dict :func:`cdmoe.evaluation.lmeval.evaluate`
returns. The model is never loaded in this process.

The vLLM interpreter: ``--vllm-python``, else ``$CDMOE_VLLM_PYTHON``, else ``.venv-vllm/bin/python``
in the current directory (where ``scripts/setup_vllm.sh`` puts it).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from ..errors import CdmoeError
from ..io.remote_code import trusted

__all__ = ["evaluate_vllm", "vllm_python"]

_SETUP = "bash scripts/setup_vllm.sh makes one in .venv-vllm"


def vllm_python(explicit: str | Path | None = None) -> Path:
    """The Python interpreter of the vLLM venv (see the module docstring); a one-line error if absent."""
    candidate = explicit or os.environ.get("CDMOE_VLLM_PYTHON") or Path(".venv-vllm") / "bin" / "python"
    path = Path(candidate)
    if not path.is_file():
        how = "--vllm-python" if explicit else "no --vllm-python given, and $CDMOE_VLLM_PYTHON or .venv-vllm/bin/python"
        raise CdmoeError(f"{how}: {path} is not a Python interpreter; pass the Python of a venv with vLLM, lm-eval and "
                         f"plugins/vllm ({_SETUP})")
    return path


def evaluate_vllm(model_path: str | Path, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                  batch_size: str | int = "auto", dtype: str = "auto", seed: int = 0, python: str | Path | None = None,
                  max_model_len: int | None = None, tensor_parallel_size: int = 1) -> dict:
    """lm-eval with vLLM on the directory ``model_path``; returns ``{"results", "n-samples", "versions",
    "tasks", "limit", "backend"}`` like :func:`cdmoe.evaluation.lmeval.evaluate`."""
    interpreter = vllm_python(python)
    job = {"model": str(Path(model_path).resolve()), "tasks": tasks, "include_path": include_path, "limit": limit,
           "batch_size": int(batch_size) if str(batch_size).isdigit() else batch_size, "dtype": dtype, "seed": seed,
           "max_model_len": max_model_len, "tensor_parallel_size": tensor_parallel_size,
           "trust_remote_code": trusted()}
    with tempfile.TemporaryDirectory(prefix="cdmoe-vllm-eval-") as work:
        job_file, out_file = Path(work) / "job.json", Path(work) / "out.json"
        job_file.write_text(json.dumps(job))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the vLLM venv's own packages only
        proc = subprocess.run([str(interpreter), "-m", "cdmoe_vllm.lmeval_job", str(job_file), str(out_file)], env=env,
                              stdout=2)  # vLLM logs to stdout: to stderr (the fd), as all our logs
        if not out_file.exists():
            raise CdmoeError(f"the vLLM evaluation process ({interpreter}) exited with code {proc.returncode} and no "
                             f"result (its log is above); is the cdmoe plugin installed there? ({_SETUP})")
        result = json.loads(out_file.read_text())
    if "error" in result:
        raise CdmoeError(f"lm-eval with vLLM failed on {model_path}: {result['error']}")
    return {**result, "tasks": tasks, "limit": limit, "backend": "vllm"}
