"""``cdmoe condense``: load, calibrate, search, (evaluate), condense and save, end to end."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from .ablations import DroppedBlock, fused_modules, random_choices, swapped_blocks
from .api import condense_layers, save
from .calibration import CalibSpec, load_calibration
from .checkpoint import check_output_dir, write_record
from .loading import checkpoint_dtype, load_model, load_tokenizer, round_to_checkpoint_dtype
from .perplexity import perplexity, token_stream
from .plots import plot_single_layer_scores
from .search import SearchOptions, run_search

__all__ = ["EvalOptions", "condense"]


@dataclass(frozen=True)
class EvalOptions:
    """Held-out perplexity printed around a condense run (optional)."""

    text: str | None = None
    max_tokens: int = 50_000
    seq_len: int | None = None  # default: the calibration sequence length
    baselines: bool = True  # also: same layers with random experts, same layers dropped


def _rich_progress():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), transient=False)


def condense(
    model: str | Path,
    out: str | Path,
    search: SearchOptions,
    calib: CalibSpec = CalibSpec(),
    evaluation: EvalOptions = EvalOptions(),
    dtype: str = "auto",
    force: bool = False,
    show_progress: bool = True,
    quantize: str | None = None,
) -> dict:
    """Condense ``search.layers`` MoE layers of ``model`` with CD-MoE and save to ``out``; return the record.

    With ``quantize`` (int8 | int4), the condensed MLPs and remaining experts are then quantised
    (:mod:`cdmoe.quantize`) and the quantised model's perplexity is measured from disk."""
    check_output_dir(out, force)
    started = time.perf_counter()
    tokenizer = load_tokenizer(model)
    loaded = load_model(model, dtype=dtype)
    calib_ids = load_calibration(tokenizer, calib)

    progress = _rich_progress() if show_progress else None
    tasks: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        if progress is None:
            return
        if stage not in tasks:
            label = "Algorithm 1: experts per layer" if stage == "experts" else "Algorithm 2: layer candidates"
            tasks[stage] = progress.add_task(label, total=total)
        progress.update(tasks[stage], completed=done)

    with progress or nullcontext():
        result = run_search(loaded, calib_ids, search, report)

    evaluation_record = {}
    stream = None
    if evaluation.text:
        seq_len = evaluation.seq_len or calib.seq_len
        stream = token_stream(tokenizer, evaluation.text, evaluation.max_tokens)
        layers = [c.layer for c in result.choices]
        evaluation_record = {"text": evaluation.text, "tokens": len(stream), "seq_len": seq_len,
                             "original_ppl": perplexity(loaded, stream, seq_len)}
        if evaluation.baselines:
            k = len(result.choices[0].experts)
            with swapped_blocks(loaded, fused_modules(loaded, random_choices(result.record["expert_search"], layers, k, calib.seed))):
                evaluation_record["random_experts_ppl"] = perplexity(loaded, stream, seq_len)
            with swapped_blocks(loaded, {layer: DroppedBlock() for layer in layers}):
                evaluation_record["dropped_layers_ppl"] = perplexity(loaded, stream, seq_len)

    search_record = {**result.record, "calibration": {**calib.to_dict(), "tokens": int(calib_ids.numel())}}
    record = condense_layers(loaded, result.choices, base_model=str(model), search=search_record)
    stored = round_to_checkpoint_dtype(loaded, model, dtype)
    if stream is not None:
        evaluation_record["condensed_ppl"] = perplexity(loaded, stream, evaluation_record["seq_len"])
        record["evaluation"] = evaluation_record
    record["search"]["timings"]["total_s"] = time.perf_counter() - started

    def write_plots(directory: Path) -> None:
        if not record["search"]["single_layer_scores"]:  # layer-rank computes no single-layer final scores
            return
        plot_single_layer_scores(record["search"], directory / "plots" / "single_layer_js.png",
                                 title=f"{model}: single-layer condensing")

    if quantize:
        from .baselines import finish_quantized

        loaded, record["quantization"] = finish_quantized(loaded, quantize, stored or checkpoint_dtype(model))
    elif stored is not None:
        loaded.to(stored)  # computed in fp32 on CPU; saved in the checkpoint's own dtype
    path = save(loaded, out, record, tokenizer=tokenizer, force=force, extra_files=write_plots)
    if quantize and stream is not None:  # as a user loads it
        del loaded
        record["evaluation"]["quantized_ppl"] = perplexity(load_model(path), stream, evaluation_record["seq_len"])
        write_record(path, record)
    return record
