"""The paper's baselines as methods that write loadable output directories, like condense.

- ``layer-drop``: remove the N sparse MoE sub-layers whose residual stream changes least
  (highest cosine similarity before/after the MoE add on calibration tokens; He et al.,
  2406.02500). The output is a cdmoe-format checkpoint with those blocks gone.
- ``block-drop``: remove the N whole decoder layers whose output is most similar to their
  input (same paper); the remaining layers are renumbered.
- ``expert-drop``: keep the E' experts with the highest routing scores in every MoE layer,
  router restricted to them (native checkpoint, see :mod:`cdmoe.methods.expert_reduce`).
- ``msmoe``: M-SMoE merging as MC-SMoE runs it: E'_l groups per layer from a global usage
  threshold (E' on average), full router, every expert routed to its group's merged expert
  (cdmoe-format checkpoint; see :mod:`cdmoe.methods.expert_reduce`).
- ``msmoe-restricted``: variant, E' groups in every layer and the router restricted to the
  dominant experts' rows (native checkpoint).
- ``reap``: REAP (Lasby et al., ICLR 2026): keep the E' experts with the highest mean
  gate x output norm over the tokens routed to them, router restricted to them (native
  checkpoint, see :mod:`cdmoe.methods.reap`).
- ``slim``: Expert Slimming, weight-only quantisation of the experts (``--quantize``).

Any of the structural methods can be followed by ``--quantize int8|int4`` (the experts and
condensed MLPs that remain are quantised; see :mod:`cdmoe.methods.quantize`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..checkpoint.record import RECORD_FORMAT, family_name
from ..checkpoint.writer import check_output_dir, save, write_record
from ..errors import CdmoeError
from ..evaluation.measure import disk_bytes
from ..evaluation.perplexity import perplexity, token_limit, token_stream
from ..models.adapter import moe_blocks
from ..models.budget import model_params
from ..models.input_checks import check_inputs
from ..models.loading import load_model, load_tokenizer, round_to_checkpoint_dtype
from ..models.placement import resolve_device
from ..search.calibration import CalibSpec, load_calibration
from .calib_stats import CalibStats, calibration_stats
from .expert_drop import expert_drop_plans
from .expert_reduce import check_kept, merge_experts, reduce_experts
from .layer_drop import drop_blocks, drop_layers, most_similar_first, top_layers
from .msmoe import msmoe_plans, msmoe_restricted_plans
from .compressed import SCHEMES, quantize_compressed
from .quantize import check_quantize, layers_quantized, quantize_model, quantized_bytes
from .reap import reap_plans

__all__ = ["METHODS", "EXPERT_METHODS", "BaselineOptions", "apply_baseline", "baseline_record", "finish_quantized", "most_similar_first",
           "run_baseline"]

METHODS = ("layer-drop", "block-drop", "expert-drop", "reap", "msmoe", "msmoe-restricted", "slim")
EXPERT_METHODS = ("expert-drop", "reap", "msmoe", "msmoe-restricted")  # the knob is --keep-experts E'
_EXPERT_PLANS = {"expert-drop": expert_drop_plans, "msmoe-restricted": msmoe_restricted_plans,  # router restricted
                 "reap": lambda model, stats, kept: reap_plans(model, stats.reap, kept)}


@dataclass(frozen=True)
class BaselineOptions:
    method: str
    layers: int | None = None  # N for layer-drop / block-drop
    keep_experts: int | None = None  # E' for expert-drop / reap / msmoe-restricted, the average E' for msmoe
    quantize: str | None = None  # w8a8 | w4a16 | fp8 | int8 | int4 (required by slim, optional after the others)
    batch_size: int = 8

    def validate(self) -> None:
        if self.method not in METHODS:
            raise CdmoeError(f"unknown baseline {self.method!r}; use one of {', '.join(METHODS)}")
        if self.method in ("layer-drop", "block-drop") and not self.layers:
            raise CdmoeError(f"{self.method} needs --layers N (how many to drop)")
        if self.method in EXPERT_METHODS and not self.keep_experts:
            raise CdmoeError(f"{self.method} needs --keep-experts E' (routed experts kept per layer)")
        if self.method == "slim" and self.quantize is None:
            raise CdmoeError("slim needs --quantize (w8a8, w4a16, fp8, int8 or int4)")
        for option, value, users in (("--layers", self.layers, ("layer-drop", "block-drop")),
                                     ("--keep-experts", self.keep_experts, EXPERT_METHODS)):
            if value is not None and self.method not in users:
                raise CdmoeError(f"{self.method} does not use {option} (only {', '.join(users)} do); drop it")
        check_quantize(self.quantize)
        for option, value in (("--layers", self.layers), ("--keep-experts", self.keep_experts)):
            if value is not None and value < 1:
                raise CdmoeError(f"{option} must be at least 1, got {value}")


def apply_baseline(model: nn.Module, stats: CalibStats | None, options: BaselineOptions) -> tuple[nn.Module, dict]:
    """Apply the structural part of ``options`` to ``model``; return (model, method details)."""
    options.validate()
    params = model_params(model)
    if options.method == "layer-drop":
        layers = top_layers(stats.moe_cosine, options.layers, "MoE layers")
        details = {"layers": layers, "scores": {str(i): stats.moe_cosine[i] for i in sorted(stats.moe_cosine)},
                   "predicted_params": params.layer_dropped_total(layers)}
        model = drop_layers(model, layers)
    elif options.method == "block-drop":
        blocks = top_layers(stats.block_cosine, options.layers, "decoder layers")
        details = {"blocks": blocks, "scores": {str(i): stats.block_cosine[i] for i in sorted(stats.block_cosine)},
                   "predicted_params": params.block_dropped_total(blocks)}
        model = drop_blocks(model, blocks)
    elif options.method == "msmoe":
        plans = msmoe_plans(model, stats, options.keep_experts)
        groups = {p.layer: len(p.mix) for p in plans}
        details = {"keep_experts": options.keep_experts, "experts_per_layer": {str(i): n for i, n in groups.items()},
                   "router": "full", "plans": [p.to_dict() for p in plans],
                   "predicted_params": params.experts_merged_total(groups)}
        model = merge_experts(model, plans)
    elif options.method in EXPERT_METHODS:
        plans = _EXPERT_PLANS[options.method](model, stats, options.keep_experts)
        details = {"keep_experts": options.keep_experts, "plans": [p.to_dict() for p in plans],
                   "predicted_params": params.experts_reduced_total(options.keep_experts)}
        if options.method == "reap":
            details["saliency"] = {str(i): s.to_dict() for i, s in sorted(stats.reap.items())}
            details["gates"] = "the family's routing, before its routed scaling factor"
        model = reduce_experts(model, plans)
    else:
        details = {"predicted_params": params.total}
    details["params"] = params.change_to(model_params(model))
    return model, details


def finish_quantized(model: nn.Module, bits: str, storage, group: int | None = None) -> tuple[nn.Module, dict]:
    """Quantise ``model``'s experts / condensed MLPs (the other tensors stored as ``storage``, a
    :class:`~cdmoe.models.storage_dtypes.StoragePlan`, says); return the quantised model and its record entry.
    ``group``: compressed-tensors' w4a16 group size (default: from the model's widths; :func:`quantize_compressed`)."""
    if bits in SCHEMES:  # compressed-tensors, vLLM's format
        return quantize_compressed(model, bits, storage, group)
    dtype = storage.default
    moe_layers = len(moe_blocks(model))
    quantized = quantize_model(model, bits, storage=storage)
    predicted = quantized_bytes(model, bits, dtype)  # ``model`` now holds the unfused layout that was quantised
    return quantized, {"library": "bitsandbytes", "bits": bits, "format": "LLM.int8" if bits == "int8" else "NF4",
                       "targets": "routed experts and condensed MLPs", "moe_layers": moe_layers,
                       "linear_modules": layers_quantized(quantized), "predicted_payload_bytes": predicted,
                       "stored_dtype": str(dtype).removeprefix("torch.")}


def run_baseline(model: str | Path, out: str | Path, options: BaselineOptions, calib: CalibSpec = CalibSpec(),
                 eval_text: str | None = None, eval_tokens: int = 50_000, dtype: str = "auto",
                 force: bool = False, device: str = "auto") -> dict:
    """Run one baseline end to end on ``model`` (computed on ``device``) and save it to ``out``; return its record."""
    options.validate()
    resolve_device(device)
    token_limit(eval_tokens)
    check_inputs(model, calib if options.method != "slim" else None, {"--eval-text": eval_text})
    check_quantize(options.quantize, model=model)  # the scheme fits the model's widths
    inputs = (model, calib.source, eval_text)
    check_output_dir(out, force, inputs)
    started = time.perf_counter()
    tokenizer = load_tokenizer(model)
    calib_ids = load_calibration(tokenizer, calib) if options.method != "slim" else None  # before the weights load
    loaded = load_model(model, dtype=dtype, device=device)
    if options.method in _EXPERT_PLANS:  # E' out of range: refused before the calibration pass
        for block in moe_blocks(loaded):
            check_kept(block, options.keep_experts)
    stats = None
    if calib_ids is not None:
        stats = calibration_stats(loaded, calib_ids, options.batch_size, reap=options.method == "reap")
    stream = token_stream(tokenizer, eval_text, eval_tokens) if eval_text else None
    evaluation = {}
    if stream is not None:
        evaluation = {"text": eval_text, "tokens": len(stream), "seq_len": calib.seq_len,
                      "original_ppl": perplexity(loaded, stream, calib.seq_len)}
    result, details = apply_baseline(loaded, stats, options)
    storage = round_to_checkpoint_dtype(result, model, dtype)
    record = baseline_record(result, model, options.method, details)
    record["calibration"] = calib.to_dict() if stats is not None else None
    if options.quantize:
        result, record["quantization"] = finish_quantized(result, options.quantize, storage)
    if stream is not None:  # measured on the weights as saved (quantised models: as a user loads them)
        evaluation["ppl"] = perplexity(result, stream, calib.seq_len) if not options.quantize else None
        record["evaluation"] = evaluation
    record["timings"] = {"total_s": time.perf_counter() - started}
    path = save(result, out, record, tokenizer=tokenizer, force=force, storage=storage, inputs=inputs)
    if stream is not None and options.quantize:
        del result
        evaluation["ppl"] = perplexity(load_model(path, device=device), stream, calib.seq_len)
        write_record(path, record)
    record["weight_bytes"] = disk_bytes(path)
    return record


def baseline_record(model: nn.Module, source: str | Path, method: str, details: dict) -> dict:
    """The ``cdmoe.json`` record of a baseline output, from :func:`apply_baseline`'s details (consumed)."""
    return {"format_version": RECORD_FORMAT, "method": method, "base_model": str(source), "family": family_name(model),
            "params": details.pop("params"), "baseline": details}
