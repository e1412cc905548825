"""``cdmoe condense``: load, calibrate, search, (evaluate), condense and save, end to end."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.fp8_output import save_weights
from ..checkpoint.record import condense_layers
from ..checkpoint.stream_save import condensed_skeleton, write_streamed
from ..checkpoint.writer import write_condensed, write_record
from ..errors import CdmoeError
from ..evaluation.perplexity import perplexity, token_limit, token_stream
from ..evaluation.plots import plot_single_layer_scores
from ..models.loading import load_model, round_to_checkpoint_dtype
from ..models.storage_dtypes import cast_to_storage, plan_of
from ..search.calibration import CalibSpec
from ..search.resume import SearchState, run_key
from ..search.run import SearchOptions, run_search
from .ablations import DroppedBlock, fused_modules, random_choices, swapped_blocks
from .compressed_stream import StreamedQuantizer
from .quantize import check_quantize
from .session import rich_progress, start_session

__all__ = ["EvalOptions", "condense"]


@dataclass(frozen=True)
class EvalOptions:
    """Held-out perplexity printed around a condense run (optional)."""

    text: str | None = None
    max_tokens: int = 50_000
    seq_len: int | None = None  # default: the calibration sequence length
    baselines: bool = True  # also: same layers with random experts, same layers dropped


def condense(
    model: str | Path,
    out: str | Path,
    search: SearchOptions,
    calib: CalibSpec = CalibSpec(),
    evaluation: EvalOptions = EvalOptions(),
    dtype: str = "auto",
    force: bool = False,
    show_progress: bool = True,
    mode: str = "auto",
    device: str = "auto",
    quantize: str | None = None,
    activations: str = "auto",
    activations_dir: str | Path | None = None,
    heal=None,
    memory_check: bool = True,
) -> dict:
    """Condense ``search.layers`` MoE layers of ``model`` with CD-MoE and save to ``out``; return the record.

    ``mode``: ``whole`` loads the model, ``sequential`` keeps one decoder layer in memory at a
    time (reading it from the safetensors shards when needed and writing the output layer by
    layer), ``auto`` picks sequential when the weights do not fit ``device``'s free memory.
    The search progress is kept in ``.OUT.partial/state/``: rerunning the same command after
    an interruption resumes it (a different command there is refused unless ``force``).
    With ``quantize`` (w8a8 | w4a16 | fp8: compressed-tensors, also layer by layer in sequential mode; int8 |
    int4: bitsandbytes, whole mode), the
    model is then quantised (:mod:`cdmoe.methods.compressed`, :mod:`cdmoe.methods.quantize`) and the quantised model's perplexity is measured from disk.
    ``activations``: ``memory`` keeps the calibration hidden states in CPU memory, ``disk`` in
    safetensors files (:mod:`cdmoe.memory.activation_cache`) in a directory inside ``activations_dir``
    (default: ``.OUT.partial/``), deleted when the search ends; same result, less memory, slower;
    ``auto``: memory when that fits, else disk. ``mode``/``activations`` ``auto`` follow the memory estimate
    (:mod:`cdmoe.memory.estimate`); when nothing fits the run stops before loading, unless not ``memory_check``.
    ``heal`` (a :class:`~cdmoe.search.heal_fit.HealOptions`): then heal the condensed layers on the same
    calibration source (:mod:`cdmoe.methods.heal`), resumable like the search.
    """
    search.check()
    check_quantize(quantize)
    if heal is not None:
        heal.check()
        if quantize in ("int8", "int4"):
            raise CdmoeError(f"--heal with --quantize {quantize} (bitsandbytes) is not supported; use w8a8, w4a16 or "
                             "fp8 (compressed-tensors), quantised after healing")
    written = quantize if heal is None else None  # with --heal: healed first, then quantised
    token_limit(evaluation.max_tokens)
    session = start_session(model, out, calib, {"--eval-text": evaluation.text}, dtype=dtype, device=device,
                            mode=mode, force=force, activations=activations, activations_dir=activations_dir,
                            search=search, memory_check=memory_check, quantize=quantize)
    check_quantize(quantize, model=model)  # the scheme fits the model's widths (config only)
    if session.mode == "sequential" and evaluation.text:
        raise CdmoeError("--eval-text needs the whole model in memory; drop it (evaluate the output with "
                         "cdmoe eval) or use --mode whole")
    if session.mode == "sequential" and quantize in ("int8", "int4"):
        raise CdmoeError(f"--quantize {quantize} (bitsandbytes) needs the whole model in memory; use --mode whole, "
                         "or a compressed-tensors scheme (w8a8 | w4a16 | fp8), written layer by layer")
    calib_ids = session.calibrate()
    tokenizer = session.tokenizer
    key = run_key(model, calib.to_dict(), calib_ids, search, {"dtype": str(session.compute), "device": session.dev.type})

    progress = rich_progress() if show_progress else None
    tasks: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        if progress is None:
            return
        if stage not in tasks:
            label = "Algorithm 1: experts per layer" if stage == "experts" else "Algorithm 2: layer candidates"
            tasks[stage] = progress.add_task(label, total=total)
        progress.update(tasks[stage], completed=done)

    with session.open(key, SearchState) as (tmp, state, loaded, store, cache):
        with progress or nullcontext():
            result = run_search(loaded, calib_ids, search, report, store=store, state=state, activations=cache,
                                memory=session.choice.search)
        search_record = {**result.record, "calibration": {**calib.to_dict(), "tokens": int(calib_ids.numel())},
                         "mode": session.mode, "mode_reason": session.why, "device": str(session.dev),
                         "activations": session.activations, "memory_plan": session.choice.to_dict()}
        if store is not None:
            search_record["cost"]["decoder_layer_loads"] = store.loads
        if session.mode == "whole":
            record, write_weights = _whole(loaded, model, result, search_record, evaluation, calib, tokenizer, dtype,
                                           written)
        else:
            skeleton, record = condensed_skeleton(store, result.choices, str(model), search_record)
            storage = plan_of(store.model, model, dtype)
            quantizer = StreamedQuantizer.prepare(skeleton, written, storage) if written else None
            if quantizer is not None:
                record["quantization"] = quantizer.record()

            def write_weights(directory: Path) -> None:
                write_streamed(store, skeleton, {c.layer: (c.experts, c.gates) for c in result.choices}, directory,
                               storage, layer_tensors=quantizer)

        record["search"]["timings"]["total_s"] = time.perf_counter() - session.started

        def write_plots(directory: Path) -> None:
            if not record["search"]["single_layer_scores"]:  # layer-rank computes no single-layer final scores
                return
            plot_single_layer_scores(record["search"], directory / "plots" / "single_layer_js.png",
                                     title=f"{model}: single-layer condensing")

        write_condensed(tmp, record, write_weights, tokenizer=tokenizer, extra_files=write_plots)
        if heal is not None:
            del loaded, store, write_weights  # healing loads the original model again (or layer by layer)
            record = session.heal(tmp, record, heal, show_progress)
            if quantize:
                record = session.quantize(tmp, record, quantize)
    if quantize and "evaluation" in record:  # as a user loads it
        ev = record["evaluation"]
        ev["quantized_ppl"] = perplexity(load_model(out, device=device), token_stream(tokenizer, ev["text"], evaluation.max_tokens),
                                         ev["seq_len"])
        write_record(out, record)
    return record


def _whole(loaded, model, result, search_record: dict, evaluation: EvalOptions, calib: CalibSpec, tokenizer,
           dtype: str, quantize: str | None = None):
    """Whole mode after the search: optional perplexity, condense in memory; (record, weight writer)."""
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

    record = condense_layers(loaded, result.choices, base_model=str(model), search=search_record)
    storage = round_to_checkpoint_dtype(loaded, model, dtype)
    if stream is not None:
        evaluation_record["condensed_ppl"] = perplexity(loaded, stream, evaluation_record["seq_len"])
        record["evaluation"] = evaluation_record
    if quantize:
        from .baselines import finish_quantized

        loaded, record["quantization"] = finish_quantized(loaded, quantize, storage)
        storage = None  # written as bitsandbytes holds it
    else:
        cast_to_storage(loaded, storage)  # computed in fp32 on CPU; saved in the source's dtypes, tensor by tensor
    return record, lambda directory: save_weights(loaded, directory, storage)
