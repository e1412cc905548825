"""One call per job, as the CLI's commands: ``cdmoe.condense``, ``cdmoe.heal``, ``cdmoe.evaluate``, ``cdmoe.compare``,
``cdmoe.sweep``, ``cdmoe.baseline`` (and ``cdmoe.plan``, ``cdmoe.finetune``), in the spirit of
``llmcompressor.oneshot(...)`` and ``torchao.quantize_(model, config)``::

    import cdmoe
    record = cdmoe.condense("path/to/moe", out="out/", layers=9, experts=6, calib="c4")
    scores = cdmoe.evaluate("out/", tasks="paper")

Every keyword is the CLI option of the same name; each function returns the record or result
the command writes. ``trust_remote_code=True`` is ``--trust-remote-code`` for that call. Every
argument is checked against its annotation when the call enters (:func:`cdmoe.io.arguments.checked`):
a wrong type or value raises :class:`cdmoe.CdmoeError` (a ``ValueError``) naming the argument.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from transformers import PreTrainedModel

from .io.arguments import checked
from .io.remote_code import trust_remote_code as _trust
from .models.placement import matmul_precision

__all__ = ["baseline", "compare", "condense", "evaluate", "heal", "sweep"]


@contextlib.contextmanager
def _context(trust_remote_code: bool, dtype: str | None):
    """What a CLI command sets for its whole run: the trust decision and the matmul precision (``dtype="tf32"``)."""
    with _trust(trust_remote_code), matmul_precision(dtype):
        yield


@checked
def condense(model: str | Path | PreTrainedModel, out: str | Path, *, layers: int | None = None,
             budget: float | None = None, experts: int | None = None,
             shared_only: bool = False, calib: str = "c4", samples: int = 100, seq_len: int = 512, seed: int = 0,
             metric: str = "js", final: str = "hidden", expert_selector: str = "greedy", layer_selector: str = "greedy",
             batch_size: int = 8, eval_text: str | None = None, eval_tokens: int = 50_000, dtype: str = "auto",
             mode: str = "auto", device: str = "auto", quantize: str | None = None, activations: str = "auto",
             force: bool = False, tokenizer=None, trust_remote_code: bool = False, progress: bool = False,
             heal: bool = False, heal_samples: int | None = None) -> dict:
    """Condense ``layers`` MoE layers of ``model`` with CD-MoE (Eq. 2, Algorithms 1 and 2) and save to
    ``out``; return the record (``cdmoe.json``). ``heal``: then heal the condensed layers (:func:`heal`).

    ``model``: a checkpoint path or hub id (``cdmoe condense``: resumable, whole or sequential), or a model
    already loaded (``cdmoe.load_model``; searched and condensed in place, in memory, then saved, its
    tokenizer from ``tokenizer`` or the directory it was loaded from). ``shared_only`` is CD-MoE-S (K = 0).
    ``budget`` instead of ``layers``: the budget planner (``cdmoe condense --budget``) on a checkpoint path.
    """
    from .methods.budget_plan import check_budget_options
    from .methods.condense import EvalOptions
    from .methods.condense import condense as run_condense
    from .search.calibration import CalibSpec
    from .search.run import SearchOptions, experts_option

    check_budget_options(layers, budget, {"experts": experts is not None, "shared_only": shared_only,
                                          "expert_selector": expert_selector != "greedy",
                                          "layer_selector": layer_selector != "greedy", "eval_text": bool(eval_text),
                                          "a loaded model": isinstance(model, PreTrainedModel)})
    from .search.heal_fit import HealOptions

    healing = HealOptions(samples=heal_samples) if heal or heal_samples is not None else None
    if budget is not None:
        from .methods.budget_plan import condense_budget
        from .search.plan_run import PlanOptions

        with _context(trust_remote_code, dtype):
            return condense_budget(model, out, PlanOptions(budgets=(budget,), metric=metric, final=final,
                                                           batch_size=batch_size), CalibSpec(calib, samples, seq_len, seed),
                                   dtype=dtype, force=force, show_progress=progress, mode=mode, device=device,
                                   activations=activations, heal=healing, quantize=quantize)
    search = SearchOptions(layers=layers, experts=experts_option(experts, shared_only), metric=metric, final=final,
                           batch_size=batch_size, expert_selector=expert_selector, layer_selector=layer_selector,
                           seed=seed)
    spec = CalibSpec(calib, samples, seq_len, seed)
    with _context(trust_remote_code, dtype):
        if isinstance(model, PreTrainedModel):
            if healing is not None:
                from .errors import CdmoeError

                raise CdmoeError("heal=True needs the original model's path (healing reads it again); pass the path")
            if quantize is not None:
                from .errors import CdmoeError

                raise CdmoeError(f"quantize={quantize!r} needs the model's path (its stored dtypes are read from it); "
                                 "pass the path, or quantise the saved output with cdmoe.baseline('slim', ...)")
            return _condense_loaded(model, out, search, spec, tokenizer, force)
        return run_condense(model, out, search, spec, EvalOptions(text=eval_text, max_tokens=eval_tokens), dtype=dtype,
                            force=force, show_progress=progress, mode=mode, device=device, quantize=quantize,
                            activations=activations, heal=healing)


def _condense_loaded(model: PreTrainedModel, out, search, calib, tokenizer, force: bool) -> dict:
    """The in-memory path of :func:`condense` for a model the caller has loaded."""
    from .checkpoint.record import condense_layers
    from .checkpoint.writer import check_output_dir, save
    from .errors import CdmoeError
    from .models.loading import load_tokenizer
    from .search.calibration import load_calibration
    from .search.run import run_search

    source = getattr(model.config, "_name_or_path", None) or None
    if tokenizer is None:
        if not source:
            raise CdmoeError("pass tokenizer=... : the model does not say which directory it was loaded from")
        tokenizer = load_tokenizer(source)
    search.check()
    check_output_dir(out, force, (source, calib.source))
    calib_ids = load_calibration(tokenizer, calib)
    result = run_search(model, calib_ids, search)
    searched = {**result.record, "calibration": {**calib.to_dict(), "tokens": int(calib_ids.numel())}, "mode": "in memory"}
    record = condense_layers(model, result.choices, base_model=source, search=searched)
    save(model, out, record, tokenizer=tokenizer, source=source, force=force, inputs=(calib.source,))
    return record


@checked
def heal(directory: str | Path, out: str | Path, *, original: str | Path | None = None, calib: str | None = None,
         samples: int | None = None, seq_len: int | None = None, seed: int | None = None, steps: int = 300,
         lr: float = 0.05, batch_tokens: int = 4096, val_share: float = 0.1, eval_every: int = 25, patience: int = 4,
         eval_text: str | None = None, eval_tokens: int = 50_000, dtype: str = "auto", mode: str = "auto",
         device: str = "auto", activations: str = "auto", force: bool = False, trust_remote_code: bool = False,
         progress: bool = False) -> dict:
    """``cdmoe heal``: train the condensed layers of the condensed directory ``directory`` to reproduce the
    original MoE blocks (layer-local distillation on calibration text; the original from the record's
    ``base_model`` unless ``original``); save to ``out``; return the record."""
    from .methods.condense import EvalOptions
    from .methods.heal import heal as run_heal
    from .search.heal_fit import HealOptions

    options = HealOptions(samples=samples, val_share=val_share, steps=steps, lr=lr, batch_tokens=batch_tokens,
                          eval_every=eval_every, patience=patience)
    with _context(trust_remote_code, dtype):
        return run_heal(directory, out, options, original=original, calib=calib, seq_len=seq_len, seed=seed,
                        evaluation=EvalOptions(text=eval_text, max_tokens=eval_tokens), dtype=dtype, mode=mode,
                        device=device, activations=activations, force=force, show_progress=progress)


@checked
def evaluate(model: str | Path, *, tasks: str = "paper", task_text: str | None = None, limit: int | None = None,
             batch_size: int | str = "auto", out: str | Path | None = None, dtype: str = "auto",
             ppl_text: str | None = None,
             ppl_seq_len: int = 512, ppl_stride: int | None = None, ppl_tokens: int | None = None, force: bool = False,
             device: str = "auto", trust_remote_code: bool = False, backend: str = "hf",
             vllm_python: str | None = None, tensor_parallel_size: int | None = None,
             max_model_len: int | None = None) -> dict:
    """``cdmoe eval``: lm-evaluation-harness tasks (the paper's 8 by default; ``tasks="none"`` skips them)
    and held-out perplexity on ``ppl_text``; writes ``out`` (default ``./eval.json``) and returns the result."""
    from .evaluation.lmeval import run_eval

    with _context(trust_remote_code, dtype):
        return run_eval(model, tasks, task_text, limit, str(batch_size), out, dtype, ppl_text, ppl_seq_len, ppl_stride,
                        ppl_tokens, force=force, backend=backend, vllm_python=vllm_python,
                        tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len, device=device)


@checked
def compare(model: str | Path, out: str | Path, *, budgets: list[float], methods: str = "default", calib: str = "c4",
            samples: int = 100, seq_len: int = 512, seed: int = 0, eval_text: str | None = None,
            eval_tokens: int = 50_000, tasks: str | None = None, task_text: str | None = None, dtype: str = "auto",
            peak_rss: bool = False, force: bool = False, device: str = "auto", trust_remote_code: bool = False) -> dict:
    """``cdmoe compare``: every method at matched memory ``budgets``, each point saved and scored from disk."""
    from .comparison.compare import compare as run_compare
    from .comparison.compare import parse_methods
    from .search.calibration import CalibSpec

    with _context(trust_remote_code, dtype):
        return run_compare(model, out, list(budgets), parse_methods(methods), CalibSpec(calib, samples, seq_len, seed),
                           eval_text=eval_text, eval_tokens=eval_tokens, tasks=tasks, task_text=task_text, dtype=dtype,
                           force=force, measure_rss=peak_rss, progress=lambda message: None, device=device)


@checked
def sweep(model: str | Path, out: str | Path, *, layers: list[int], experts: int | None = None, calib: str = "c4",
          samples: int = 100, seq_len: int = 512, seed: int = 0, metric: str = "js", final: str = "hidden",
          eval_text: str | None = None, eval_tokens: int = 50_000, dtype: str = "auto", force: bool = False,
          device: str = "auto", trust_remote_code: bool = False) -> dict:
    """``cdmoe sweep``: one search, a condensed output per N in ``layers`` and a report; returns the report."""
    from .comparison.sweep import sweep as run_sweep
    from .methods.condense import EvalOptions
    from .search.calibration import CalibSpec
    from .search.run import SearchOptions

    options = SearchOptions(layers=max(layers, default=1), experts=experts, metric=metric, final=final)
    with _context(trust_remote_code, dtype):
        return run_sweep(model, out, list(layers), options, CalibSpec(calib, samples, seq_len, seed),
                         EvalOptions(text=eval_text, max_tokens=eval_tokens), dtype=dtype, force=force, device=device)


@checked
def baseline(method: str, model: str | Path, out: str | Path, *, layers: int | None = None,
             keep_experts: int | None = None, quantize: str | None = None, calib: str = "c4", samples: int = 100,
             seq_len: int = 512, seed: int = 0, eval_text: str | None = None, eval_tokens: int = 50_000,
             dtype: str = "auto", force: bool = False, device: str = "auto", trust_remote_code: bool = False) -> dict:
    """``cdmoe baseline``: ``layer-drop``, ``block-drop``, ``expert-drop``, ``reap``, ``msmoe``, ``msmoe-restricted`` or ``slim`` as an output directory."""
    from .methods.baselines import BaselineOptions, run_baseline
    from .search.calibration import CalibSpec

    with _context(trust_remote_code, dtype):
        return run_baseline(model, out, BaselineOptions(method, layers=layers, keep_experts=keep_experts,
                                                        quantize=quantize), CalibSpec(calib, samples, seq_len, seed),
                            eval_text=eval_text, eval_tokens=eval_tokens, dtype=dtype, force=force, device=device)
