"""``cdmoe eval``: lm-evaluation-harness on an in-memory model (its ``HFLM`` wrapper).

``--tasks paper`` is the paper's eight zero-shot tasks (they download from the hub);
``--tasks demo`` builds local tasks from held-out text (:mod:`cdmoe.evaluation.demo_tasks`); ``none``
runs no lm-eval task; any other value is a comma-separated list of lm-eval task names.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CdmoeError
from ..io.optional_deps import require
from ..io.write_rule import work_dir

__all__ = ["PAPER_TASKS", "check_tasks", "resolve_tasks", "evaluate", "summarize"]

PAPER_TASKS = ["arc_challenge", "boolq", "hellaswag", "mmlu", "openbookqa", "piqa", "rte", "winogrande"]
# the headline metric per task, as the paper's tables report them
PRIMARY_METRIC = {"arc_challenge": "acc_norm", "hellaswag": "acc_norm", "openbookqa": "acc_norm", "piqa": "acc_norm"}


def resolve_tasks(tasks: str, task_text: str | Path | None, workdir: Path) -> tuple[list[str], str | None]:
    """Task names and the include path for lm-eval's TaskManager."""
    from .demo_tasks import CLOZE_TASK, PPL_TASK, build_demo_tasks

    if tasks == "paper":
        return PAPER_TASKS, None
    if tasks == "demo":
        return [CLOZE_TASK, PPL_TASK], str(build_demo_tasks(demo_task_text(task_text), workdir))
    return [t.strip() for t in tasks.split(",") if t.strip()], None


def demo_task_text(task_text: str | Path | None) -> Path:
    """The held-out text ``--tasks demo`` is built from (default: the demo's test text), checked."""
    text = Path(task_text) if task_text else Path("demo/data/test.txt.gz")
    if not text.exists():
        raise CdmoeError(f"--task-text {text} does not exist; pass the held-out text the demo tasks are built from")
    return text


def check_tasks(tasks: str | None, task_text: str | Path | None) -> None:
    """What ``tasks`` will need, checked before any work: lm-eval installed, the demo tasks' text."""
    if tasks and tasks != "none":
        require("lm_eval", "lm-eval tasks (--tasks)")
    if tasks == "demo":
        demo_task_text(task_text)


def evaluate(model, tokenizer, tasks: list[str], include_path: str | None = None, limit: int | None = None,
             batch_size: str | int = "auto", seed: int = 0) -> dict:
    """Run lm-eval on ``model``; return its results dict (``results``, ``n-samples``, ``config``...)."""
    require("lm_eval", "lm-eval tasks (--tasks)")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed, bootstrap_iters=0)
    except Exception as err:  # task download failures surface as many exception types
        raise CdmoeError(f"lm-eval failed ({type(err).__name__}: {str(err).splitlines()[0][:300]}); the paper's "
                         "tasks need the hub; offline, use --tasks demo") from None
    return {"results": out["results"], "n-samples": out.get("n-samples", {}),
            "versions": out.get("versions", {}), "tasks": tasks, "limit": limit}


def summarize(results: dict) -> dict[str, float]:
    """One number per task: the paper's metric (accuracy in %), or word perplexity for ppl tasks."""
    summary = {}
    for task, metrics in results["results"].items():
        clean = {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k}
        if "word_perplexity" in clean:
            summary[task] = clean["word_perplexity"]
        else:
            key = PRIMARY_METRIC.get(task, "acc")
            if key in clean:
                summary[task] = 100 * clean[key]
    return summary


def run_eval(model_path: str | Path, tasks: str = "paper", task_text: str | None = None, limit: int | None = None,
             batch_size: str = "auto", out: str | Path | None = None, dtype: str = "auto",
             ppl_text: str | None = None, ppl_seq_len: int = 512, ppl_stride: int | None = None,
             ppl_tokens: int | None = None, force: bool = False, backend: str = "hf",
             vllm_python: str | None = None, tensor_parallel_size: int | None = None,
             max_model_len: int | None = None, device: str = "auto") -> dict:
    """Load ``model_path`` and evaluate; write JSON to ``out`` (default: ``eval.json`` in the current
    directory; never inside the model directory; an existing file only with ``force``).

    ``tasks="none"`` skips lm-eval; ``ppl_text`` adds held-out perplexity (see :mod:`cdmoe.evaluation.perplexity`).
    ``backend="vllm"`` runs the tasks with lm-eval's vLLM model in the vLLM venv instead
    (:mod:`cdmoe.evaluation.lmeval_vllm`; the model is not loaded here), with vLLM's
    ``tensor_parallel_size`` and ``max_model_len`` when given (vLLM's defaults: 1, the model's length).
    ``device``: where the hf backend computes (:func:`cdmoe.models.placement.place`).
    """
    from ..io.output_dir import check_output_file, write_output_file
    from ..models.input_checks import check_inputs
    from ..models.loading import load_model, load_tokenizer
    from ..models.placement import resolve_device
    from .perplexity import perplexity, token_limit, token_stream

    if batch_size != "auto" and not (str(batch_size).isdigit() and int(batch_size) >= 1):
        raise CdmoeError(f"--batch-size takes a positive integer or auto, got {batch_size!r}")
    for option, value, least in (("--ppl-seq-len", ppl_seq_len, 2), ("--ppl-stride", ppl_stride, 1),
                                 ("--limit", limit, 1), ("--tensor-parallel-size", tensor_parallel_size, 1),
                                 ("--max-model-len", max_model_len, 1)):
        if value is not None and value < least:
            raise CdmoeError(f"{option} must be at least {least}, got {value}")
    ppl_tokens = token_limit(ppl_tokens, "--ppl-tokens")
    if ppl_stride is not None and ppl_stride > ppl_seq_len:
        raise CdmoeError(f"--ppl-stride {ppl_stride} is larger than --ppl-seq-len {ppl_seq_len}; tokens would be skipped")
    if backend not in ("hf", "vllm"):
        raise CdmoeError(f"--backend takes hf or vllm, got {backend!r}")
    if backend != "vllm" and (tensor_parallel_size is not None or max_model_len is not None):
        raise CdmoeError("--tensor-parallel-size and --max-model-len set up vLLM's engine: add --backend vllm "
                         "(--backend hf runs the model in this process)")
    if backend == "vllm" and (tasks == "none" or ppl_text):
        raise CdmoeError("--backend vllm runs lm-eval tasks only: drop --ppl-text (or use --backend hf), and pass "
                         "--tasks (the demo tasks include a perplexity task)")
    if backend == "hf":
        resolve_device(device)
        check_tasks(tasks, task_text)
    check_inputs(model_path, texts={"--ppl-text": ppl_text, "--task-text": task_text},
                 seq_lens={"--ppl-seq-len": ppl_seq_len} if ppl_text else None, quantized=True)
    target = check_output_file(out or "eval.json", force, inputs=(model_path, task_text, ppl_text))
    if backend == "vllm":
        from .lmeval_vllm import evaluate_vllm, vllm_python as find_vllm_python

        interpreter = find_vllm_python(vllm_python)  # before any work: a missing venv is a one-line error
    else:
        model = load_model(model_path, dtype=dtype, device=device)
        tokenizer = load_tokenizer(model_path)
    result: dict = {"results": {}, "tasks": []}
    if tasks != "none":
        with work_dir("cdmoe-tasks-", "lm-eval task files") as work:
            names, include = resolve_tasks(tasks, task_text, Path(work))
            if backend == "vllm":
                result = evaluate_vllm(model_path, names, include, limit, batch_size, dtype, python=interpreter,
                                       max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size or 1)
            else:
                result = evaluate(model, tokenizer, names, include, limit, batch_size)
    result["summary"] = summarize(result)
    if ppl_text:  # (--backend hf only, checked above)
        stream = token_stream(tokenizer, ppl_text, ppl_tokens, option="--ppl-text")
        value = perplexity(model, stream, ppl_seq_len, ppl_stride)
        result["perplexity"] = {"text": ppl_text, "tokens": len(stream), "seq_len": ppl_seq_len,
                                "stride": ppl_stride or ppl_seq_len, "perplexity": value}
        result["summary"]["perplexity"] = value
    result["model"] = str(model_path)
    write_output_file(target, json.dumps(result, indent=2, default=str) + "\n")
    result["written_to"] = str(out or "eval.json")
    return result
