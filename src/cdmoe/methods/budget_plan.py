"""``cdmoe condense MODEL --out DIR --budget 0.6``: the budget planner end to end (issue #26).

Calibrate, run the planner (:mod:`cdmoe.search.plan_run`: Eq. 2 gates, Algorithm 1's expert order and
REAP's saliency per MoE layer, then the greedy search over keep / prune / condense / drop until the bytes
fit the budget), apply the chosen plan and write one checkpoint (:func:`cdmoe.models.mixed.apply_plan`:
the family's own format where it can express the result, else the cdmoe format), whole or one decoder
layer at a time (sequential mode), resumable after a kill like ``cdmoe condense --layers``.

The budget is a ratio of the original's weight bytes as ``cdmoe compare`` measures them (its safetensors
files) and a ceiling: the predicted bytes of the output (exact tensor bytes plus a bound on the headers,
:mod:`cdmoe.models.byte_budget`) never exceed it.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.record import RECORD_FORMAT, family_name
from ..checkpoint.stream_save import meta_copy, write_streamed
from ..checkpoint.writer import write_condensed, write_record
from ..errors import CdmoeError
from ..evaluation.measure import disk_bytes
from ..models.budget import model_params
from ..models.byte_budget import ByteTable
from ..models.compressed_bytes import QUANT_SCHEMES
from ..models.loading import round_to_checkpoint_dtype
from ..models.mixed import LayerAction, apply_plan, build_block
from ..models.storage_dtypes import cast_to_storage, plan_of
from ..search.calibration import CalibSpec
from ..search.plan_run import PlanOptions, PlanResult, run_plan
from ..search.plan_state import PlanState
from ..search.resume import run_key
from .baselines import finish_quantized
from .compressed_stream import StreamedQuantizer
from .quantize import check_quantize
from .reap import expert_saliency
from .session import rich_progress, start_session

__all__ = ["apply_budget_plan", "budget_record", "check_budget_options", "check_budget_quantize", "check_budget_source", "condense_budget", "original_bytes",
           "plan_budgets", "plan_from_record", "plan_summary", "replay_budget_plan"]


def check_budget_options(layers: int | None, budget: float | None, conflicts: dict[str, bool]) -> None:
    """Exactly one of ``--layers`` / ``--budget``; the options a budget plan does not take are refused."""
    if (layers is None) == (budget is None):
        raise CdmoeError("pass --layers N (condense N layers) or --budget R (a plan within R of the weight bytes), "
                         "not both" if layers is not None else "pass --layers N or --budget R (e.g. --budget 0.6)")
    if budget is not None:
        given = [name for name, on in conflicts.items() if on]
        if given:
            raise CdmoeError(f"{given[0]} does not apply to --budget (the planner chooses every layer's action); "
                             "drop it or use --layers")


def check_budget_source(model) -> None:
    """A block-FP8 source is refused (before any work): the planner's pruned layers renumber their experts,
    which the FP8 writer (:mod:`cdmoe.checkpoint.fp8_output`) would re-quantise instead of copying."""
    from ..models.fp8_blocks import block_fp8
    from ..models.input_checks import read_config

    path = Path(model)
    if path.is_dir() and block_fp8(path, read_config(path)) is not None:
        raise CdmoeError(f"{model} is a block-FP8 checkpoint, which the budget planner does not write yet (its "
                         "output would not keep the source's fp8 bytes); plan its bf16 cast, or condense it with "
                         "--layers N, which keeps them")


def reap_saliency(block, x: torch.Tensor) -> torch.Tensor:
    """REAP's saliency (E,) of one MoE layer from its block inputs x (T, H) (:mod:`cdmoe.methods.reap`)."""
    return expert_saliency(block, x).mean()


def original_bytes(source, table: ByteTable) -> int:
    """What a budget is a ratio of: the source's safetensors bytes (as ``compare`` measures them), or the
    predicted bytes of the unchanged model when the source is not a local directory with safetensors."""
    try:
        return disk_bytes(source) if Path(str(source)).is_dir() and any(Path(str(source)).glob("*.safetensors")) \
            else table.total({})
    except Exception:  # e.g. .bin-only: predicted
        return table.total({})


def plan_budgets(model: nn.Module, source, calib_ids: torch.Tensor, options: PlanOptions, report=None, store=None,
                 state=None, activations=None, dtype: str = "auto",
                 quantize: str | None = None) -> tuple[PlanResult, ByteTable]:
    """Run the planner on ``model`` (loaded from ``source``; ``store``: sequential mode) for ``options.budgets``.
    ``quantize`` (w8a8 | w4a16 | fp8): the plans' bytes are those of the output quantised by that
    compressed-tensors scheme (:class:`~cdmoe.models.byte_budget.ByteTable`); the budget stays a ratio of
    the unquantised source's bytes."""
    storage = plan_of(store.model if store is not None else model, source, dtype)
    plain = ByteTable(model, storage)
    table = plain if quantize is None else ByteTable(model, storage, quantize)
    result = run_plan(model, calib_ids, options, table, original_bytes(source, plain), reap_saliency, report,
                      store=store, state=state, activations=activations)
    return result, table


def plan_summary(plan: dict[int, LayerAction]) -> str:
    """One line: how many MoE layers each action got, e.g. ``keep 2, prune 3, condense 1, drop 1``."""
    counts = {kind: sum(1 for a in plan.values() if a.kind == kind) for kind in ("keep", "prune", "condense", "drop")}
    return ", ".join(f"{kind} {n}" for kind, n in counts.items() if n)


def budget_record(model: nn.Module, before, base_model, ratio: float, result: PlanResult, search: dict) -> dict:
    """The ``cdmoe.json`` record of one budget's output; ``model`` is already the planned model, ``before``
    the :class:`~cdmoe.models.budget.ModelParams` of the original."""
    plan = result.plans[ratio]
    expert_search = result.record["expert_search"]
    original = result.record["original_bytes"]
    return {
        "format_version": RECORD_FORMAT,
        "method": "budget",
        "base_model": str(base_model),
        "family": family_name(model),
        "native_format": not hasattr(model.config, "cdmoe"),
        "budget": {"ratio": ratio, "budget_bytes": int(ratio * original), "original_bytes": original,
                   "predicted_bytes": result.predicted[ratio], "predicted_ratio": result.predicted[ratio] / original,
                   "predicted_tensor_bytes": result.tensor_bytes[ratio]},
        "layers": {str(layer): action.to_dict() for layer, action in sorted(plan.items())},
        "steps": result.steps[ratio],
        "condensed": [{"layer": layer, "experts": list(a.experts), "gates": list(a.gates),
                       "token_counts": [expert_search[str(layer)]["token_counts"][e] for e in a.experts]}
                      for layer, a in sorted(plan.items()) if a.kind == "condense"],
        "pruned": [{"layer": layer, "experts": list(a.experts)} for layer, a in sorted(plan.items())
                   if a.kind == "prune"],
        "dropped": [layer for layer, a in sorted(plan.items()) if a.kind == "drop"],
        "params": before.change_to(model_params(model)),
        "search": search,
    }


def plan_from_record(record: dict, where) -> dict[int, LayerAction]:
    """{MoE layer: action} of a budget record's ``layers``, or a one-line error naming the record."""
    layers = record.get("layers")
    try:
        return {int(layer): LayerAction.from_dict(entry) for layer, entry in layers.items()}
    except (AttributeError, KeyError, TypeError, ValueError, CdmoeError):
        raise CdmoeError(f"{where}: 'layers' must map MoE layers to actions ({{\"action\": \"prune\", \"experts\": "
                         "[..]}}, ...); rerun the cdmoe condense --budget that wrote this record") from None


def replay_budget_plan(model: nn.Module, record: dict, where, source) -> dict:
    """``cdmoe apply`` of a budget record: its per-layer actions on ``model``, in place; the new record."""
    plan = plan_from_record(record, where)
    before = model_params(model)
    apply_plan(model, plan)
    return {**{k: v for k, v in record.items() if k != "versions"}, "base_model": str(source),
            "family": family_name(model), "native_format": not hasattr(model.config, "cdmoe"), "replayed_from": str(where),
            "params": before.change_to(model_params(model))}


def apply_budget_plan(model: nn.Module, source, ratio: float, result: PlanResult, search: dict) -> dict:
    """Make ``model`` (whole, in memory) the plan of ``ratio`` in place; return its record."""
    before = model_params(model)
    apply_plan(model, result.plans[ratio])
    return budget_record(model, before, source, ratio, result, search)


def check_budget_quantize(quantize: str | None) -> None:
    """The schemes a budget plan is written in: compressed-tensors' (its bytes are priced exactly)."""
    if quantize is None:
        return
    check_quantize(quantize)
    if quantize not in QUANT_SCHEMES:
        raise CdmoeError(f"--budget with --quantize {quantize} (bitsandbytes) is not supported: the planner prices "
                         f"compressed-tensors outputs; use --quantize {' | '.join(QUANT_SCHEMES)}")


def condense_budget(model: str | Path, out: str | Path, options: PlanOptions, calib: CalibSpec = CalibSpec(),
                    dtype: str = "auto", force: bool = False, show_progress: bool = True, mode: str = "auto",
                    device: str = "auto", activations: str = "auto",
                    activations_dir: str | Path | None = None, memory_check: bool = True, heal=None,
                    quantize: str | None = None) -> dict:
    """Plan ``model`` for the one budget of ``options`` and save the result to ``out``; return the record.
    ``mode``, ``device``, ``activations`` and resuming as :func:`cdmoe.methods.condense.condense`.
    ``quantize`` (w8a8 | w4a16 | fp8; whole or sequential mode): the plan is made in the bytes of that compressed-tensors
    scheme and its output quantised (:mod:`cdmoe.methods.compressed`): the planner's divergences are those
    of the unquantised actions; quantisation is then applied to the chosen plan."""
    options.check()
    if heal is not None:
        heal.check()
    check_budget_quantize(quantize)
    written = quantize if heal is None else None  # with --heal: healed first, then quantised
    if len(options.budgets) != 1:
        raise ValueError("condense_budget writes one budget; compare plans several")
    ratio = options.budgets[0]
    session = start_session(model, out, calib, {}, dtype=dtype, device=device, mode=mode, force=force,
                            activations=activations, activations_dir=activations_dir, memory_check=memory_check,
                            quantize=quantize)
    check_budget_source(model)
    if quantize:
        check_quantize(quantize, model=model)  # the scheme fits the model's widths (config only)
    calib_ids = session.calibrate()
    key = run_key(model, calib.to_dict(), calib_ids, options, {"dtype": str(session.compute), "device": session.dev.type,
                                                               "quantize": quantize})
    progress = rich_progress() if show_progress else None
    tasks: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        if progress is not None:
            if stage not in tasks:
                label = "experts per layer (Alg. 1, REAP)" if stage == "experts" else "planner: candidates scored"
                tasks[stage] = progress.add_task(label, total=total or None)
            progress.update(tasks[stage], completed=done)

    with session.open(key, PlanState) as (tmp, state, loaded, store, cache):
        with progress or nullcontext():
            result, table = plan_budgets(loaded, model, calib_ids, options, report, store, state, cache, dtype,
                                         quantize)
        search = {**result.record, "calibration": {**calib.to_dict(), "tokens": int(calib_ids.numel())},
                  "mode": session.mode, "mode_reason": session.why, "device": str(session.dev),
                  "activations": session.activations, "memory_plan": session.choice.to_dict()}
        if store is None:
            record = apply_budget_plan(loaded, model, ratio, result, search)
            storage = round_to_checkpoint_dtype(loaded, model, dtype)
            if written:  # the plan's priced scheme (w4a16: the group priced, from the source's widths)
                loaded, record["quantization"] = finish_quantized(loaded, written, storage, table.group)
                record["budget"]["quantize"] = quantize
            else:
                cast_to_storage(loaded, storage)  # the source's dtypes

            def write_weights(directory: Path) -> None:
                loaded.save_pretrained(directory, max_shard_size="5GB")
        else:
            search["cost"]["decoder_layer_loads"] = store.loads
            skeleton = meta_copy(store)
            record = apply_budget_plan(skeleton, model, ratio, result, search)
            swaps = {layer: partial(build_block, action=a) for layer, a in result.plans[ratio].items()
                     if a != LayerAction()}
            quantizer = None
            if written:  # layer by layer, the group priced
                quantizer = StreamedQuantizer.prepare(skeleton, written, table.storage, table.group)
                record["quantization"], record["budget"]["quantize"] = quantizer.record(), written

            def write_weights(directory: Path) -> None:
                write_streamed(store, skeleton, swaps, directory, table.storage, layer_tensors=quantizer)

        record["search"]["timings"]["total_s"] = time.perf_counter() - session.started
        write_condensed(tmp, record, write_weights, tokenizer=session.tokenizer)
        if heal is not None and record.get("condensed"):  # the plan's condensed layers, as condense --heal does
            del loaded, store, write_weights  # healing loads the original model again (or layer by layer)
            record = session.heal(tmp, record, heal, show_progress)
        if quantize and heal is not None:  # the healed plan, quantised in the scheme it was priced in
            loaded = store = write_weights = None  # the (healed) output is read again from tmp
            record["budget"]["quantize"] = quantize
            record = session.quantize(tmp, record, quantize, table.group)
    record["budget"]["written_bytes"] = disk_bytes(out)
    write_record(out, record)
    return record
