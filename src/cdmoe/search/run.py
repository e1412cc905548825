"""The CD-MoE search end to end: gates (Eq. 2), experts (Alg. 1) per layer, layers (Alg. 2).

    runner  = one forward pass per calibration batch, caching every layer's input
    per MoE layer l: run layer l alone on its cached input -> X, block output, layer output
                     gates g_i (Eq. 2); greedy experts (Alg. 1); the fused condensed MLP
    greedy layers (Alg. 2) over all MoE layers, re-running only from each candidate onward

The model is left unchanged; the result is a list of :class:`~cdmoe.models.condensed.LayerChoice`
(in the greedy order) plus everything the record and plots need.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import CdmoeError
from ..memory.layer_store import ResidentStore
from ..models.adapter import MoEBlock, config_value, family_spec, moe_blocks
from ..models.condensed import LayerChoice
from .expert_search import (
    ExpertSearchResult,
    LayerActivations,
    SearchMemory,
    fixed_gates,
    greedy_experts,
    layer_divergence,
)
from .layer_search import greedy_layers
from .resume import SearchState
from .runner import LayerRunner
from .selectors import EXPERT_SELECTORS, LAYER_SELECTORS, rank_layers, select_experts

__all__ = ["Calibrated", "SearchOptions", "SearchResult", "calibrate", "experts_option", "layer_activations",
           "run_search"]


@dataclass(frozen=True)
class SearchOptions:
    layers: int  # N: MoE layers to condense
    experts: int | None = None  # K routed experts kept per layer; None = the family's top-k
    metric: str = "js"  # js | kl | ppl (ppl applies to layer selection; experts then use js)
    final: str = "hidden"  # final-output distribution for Alg. 2: hidden | logits
    batch_size: int = 8
    expert_selector: str = "greedy"  # greedy | random | l1 | frequency (see cdmoe.search.selectors)
    layer_selector: str = "greedy"  # greedy | layer-rank | global-layer-rank
    seed: int = 0  # for the random expert selector

    def check(self) -> None:
        """The checks that need no model (run before anything is loaded)."""
        if self.batch_size < 1:
            raise CdmoeError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.layers < 1:
            raise CdmoeError(f"--layers must be at least 1, got {self.layers}")
        if self.experts is not None and self.experts < 0:
            raise CdmoeError(f"--experts must be 0 (shared experts only) or more, got {self.experts}")
        if self.expert_selector not in EXPERT_SELECTORS:
            raise CdmoeError(f"unknown --expert-selector {self.expert_selector!r}; use {', '.join(EXPERT_SELECTORS)}")
        if self.layer_selector not in LAYER_SELECTORS:
            raise CdmoeError(f"unknown --layer-selector {self.layer_selector!r}; use {', '.join(LAYER_SELECTORS)}")
        if self.metric not in ("js", "kl", "ppl"):
            raise CdmoeError(f"unknown --metric {self.metric!r}; use js, kl or ppl")
        if self.final not in ("hidden", "logits"):
            raise CdmoeError(f"unknown --final {self.final!r}; use hidden or logits")

    def validate(self, num_moe_layers: int) -> None:
        self.check()
        if not 1 <= self.layers <= num_moe_layers:
            raise CdmoeError(f"--layers {self.layers} is out of range: the model has {num_moe_layers} MoE layers")


def experts_option(experts: int | None, shared_only: bool) -> int | None:
    """K from ``--experts`` and ``--shared-only`` (CD-MoE-S is K = 0)."""
    if shared_only and experts not in (None, 0):
        raise CdmoeError("--shared-only and --experts contradict each other; pass one of them")
    return 0 if shared_only else experts


@dataclass
class SearchResult:
    choices: list[LayerChoice]  # condensed layers in the greedy order
    record: dict = field(default_factory=dict)


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        raise CdmoeError(f"{what} contains NaN or inf; check the model weights and dtype (try --dtype fp32)")


@dataclass
class Calibrated:
    """What every search starts from: the runner of one calibration pass caching the MoE layers' inputs
    (only they are read again: Algorithm 1 and every later candidate), its outputs checked finite; the store;
    the residual scale of the block output; Algorithm 1's metric; the timings so far."""

    runner: LayerRunner
    store: object
    scale: float
    expert_metric: str
    timings: dict


def calibrate(model: nn.Module, spec, blocks: list[MoEBlock], calib_ids: torch.Tensor, batch_size: int, metric: str,
              store=None, activations=None) -> Calibrated:
    """One calibration pass over ``calib_ids`` in batches of ``batch_size`` (see :class:`Calibrated`)."""
    store = store if store is not None else ResidentStore(model, spec)
    t0 = time.perf_counter()
    runner = LayerRunner(model, spec, list(calib_ids.split(batch_size)), store, activations,
                         cached_layers=[b.layer_idx for b in blocks])
    for b, out in enumerate(runner.outputs):
        _check_finite(out, f"the last layer's output on calibration batch {b}")
    scale = float(config_value(model.config, spec.residual_scale_key, 1.0)) if spec.residual_scale_key else 1.0
    return Calibrated(runner, store, scale, "js" if metric == "ppl" else metric,
                      {"calibration_forward_s": time.perf_counter() - t0})


@torch.no_grad()
def layer_activations(runner: LayerRunner, block: MoEBlock, residual_scale: float) -> LayerActivations:
    """Run decoder layer ``block.layer_idx`` alone on its cached inputs; return X, block output, layer output."""
    xs, ys = [], []

    def capture(module, args, output):
        xs.append(args[0])
        ys.append(output[0] if isinstance(output, tuple) else output)

    hook = block.module.register_forward_hook(capture)
    try:
        hs = runner.run_all(block.layer_idx, stop=block.layer_idx + 1)
    finally:
        hook.remove()
    width = hs[0].shape[-1]
    acts = LayerActivations(
        x=torch.cat([x.reshape(-1, width) for x in xs]),
        y=torch.cat([y.reshape(-1, width) for y in ys]),
        h=torch.cat([h.reshape(-1, width) for h in hs]),
        residual_scale=residual_scale,
    )
    _check_finite(acts.h, f"layer {block.layer_idx} output")
    return acts


def run_search(
    model: nn.Module,
    calib_ids: torch.Tensor,
    options: SearchOptions,
    progress: Callable[[str, int, int], None] | None = None,
    store=None,
    state: SearchState | None = None,
    activations=None,
    memory: SearchMemory = SearchMemory(),
) -> SearchResult:
    """Run gates + Algorithm 1 on every MoE layer and Algorithm 2 for ``options.layers`` layers.

    ``store``: a :class:`~cdmoe.memory.layer_store.SequentialStore` whose ``model`` is ``model``
    (sequential mode: one decoder layer in memory at a time); default: ``model`` is whole.
    ``state``: resumable progress (finished layers' experts and gates, the greedy layer
    order so far), read at the start and written after every step.
    ``activations``: where the calibration hidden states wait between layers, a
    :class:`~cdmoe.memory.activation_cache.MemoryActivations` (default) or
    :class:`~cdmoe.memory.activation_cache.DiskActivations`; the selections are the same bits either way.
    Not a search option: it does not change the result (nor the resume key).
    ``memory``: what Algorithm 1 may use on the compute device (token chunks, expert-output cache);
    likewise not an option: the selections do not depend on it.
    """
    spec = family_spec(model)
    blocks = moe_blocks(model, spec)
    options.validate(len(blocks))
    for block in blocks:
        k = block.top_k if options.experts is None else options.experts
        if not 0 <= k <= block.num_experts:
            raise CdmoeError(f"--experts {k} is out of range: layer {block.layer_idx} has {block.num_experts} routed experts")
        if k == 0 and block.shared is None:
            raise CdmoeError("--shared-only needs shared experts, and this family has none; pass --experts K >= 1")
    report = progress or (lambda stage, done, total: None)
    ready = calibrate(model, spec, blocks, calib_ids, options.batch_size, options.metric, store, activations)
    runner, store, scale, expert_metric, timings = ready.runner, ready.store, ready.scale, ready.expert_metric, ready.timings

    t0 = time.perf_counter()
    per_layer, condensed, all_gates = {}, {}, {}
    for i, block in enumerate(blocks):
        k = block.top_k if options.experts is None else options.experts
        done = state.expert_layer(block.layer_idx) if state is not None else None
        if done is not None:  # finished by an interrupted run
            found, counts, gates = done
        else:
            with store.resident(block.layer_idx):
                found, counts, gates = _expert_search(runner, block, scale, k, options, expert_metric, memory)
            if state is not None:
                state.save_expert_layer(block.layer_idx, found, counts, gates)
        all_gates[block.layer_idx] = gates
        per_layer[block.layer_idx] = (found, counts)
        condensed[block.layer_idx] = store.candidate(block, found.experts, found.gates)  # whole mode: fused now
        report("experts", i + 1, len(blocks))
    timings["expert_search_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    n_cand = len(blocks)
    evals = sum(n_cand - s for s in range(options.layers))
    done = {"n": 0}

    def on_step(step: int, layer: int) -> None:
        done["n"] += 1
        report("layers", done["n"], evals)

    if options.layer_selector == "greedy":
        steps = options.layers
    else:  # ranking: one pass over the candidates (global) or none (layer-level scores)
        steps = 1 if options.layer_selector == "global-layer-rank" else 0
        evals = n_cand * steps
    try:
        found_layers = greedy_layers(runner, condensed, steps, store.set_condensed, options.final, options.metric,
                                     on_step, resume=state.layer_progress() if state is not None else None,
                                     checkpoint=state.save_layer_progress if state is not None else None,
                                     shared_passes=store.sequential)
        if options.layer_selector == "global-layer-rank":
            found_layers.order = rank_layers(found_layers.single_layer_scores, options.layers)
            found_layers.step_scores = [found_layers.single_layer_scores[layer] for layer in found_layers.order]
        elif options.layer_selector == "layer-rank":
            own = {layer: (f.step_scores[-1] if f.step_scores else f.shared_only_score)
                   for layer, (f, _) in per_layer.items()}
            found_layers.order = rank_layers(own, options.layers)
            found_layers.step_scores = [own[layer] for layer in found_layers.order]
    finally:
        for layer in condensed:
            store.set_condensed(layer, None)
    timings["layer_search_s"] = time.perf_counter() - t0

    choices = []
    for layer in found_layers.order:
        found, counts = per_layer[layer]
        choices.append(LayerChoice(
            layer=layer, experts=found.experts, gates=found.gates,
            extra={"token_counts": [int(counts[e]) for e in found.experts], "expert_step_scores": found.step_scores,
                   "shared_only_score": found.shared_only_score},
        ))
    record = {
        "method": "cd-moe",
        "expert_selector": options.expert_selector,
        "layer_selector": options.layer_selector,
        "metric": options.metric,
        "expert_metric": expert_metric,
        "final_distribution": "logits" if options.metric == "ppl" else options.final,
        "layer_output": "decoder layer output (residual + MoE block), softmax over hidden dim",
        "experts_per_layer": options.experts,
        "layer_order": found_layers.order,
        "layer_step_scores": found_layers.step_scores,
        "single_layer_scores": {str(k): v for k, v in sorted(found_layers.single_layer_scores.items())},
        "expert_search": {
            str(layer): {"experts": list(f.experts), "gates": list(f.gates), "step_scores": f.step_scores,
                         "shared_only_score": f.shared_only_score,
                         "all_gates": all_gates[layer].tolist(), "token_counts": counts.tolist()}
            for layer, (f, counts) in per_layer.items()
        },
        "cost": {
            "expert_forward_passes": sum(f.expert_passes for f, _ in per_layer.values()),
            "decoder_layer_passes": found_layers.layer_passes,
            "calibration_tokens": int(calib_ids.numel()),
        },
        "timings": timings,
    }
    if state is not None and state.resumed:
        record["resumed"] = state.resumed
    return SearchResult(choices=choices, record=record)


def _expert_search(runner: LayerRunner, block: MoEBlock, scale: float, k: int, options: SearchOptions,
                   metric: str, memory: SearchMemory) -> tuple[ExpertSearchResult, torch.Tensor, torch.Tensor]:
    """Gates (Eq. 2) and the kept experts of one MoE layer (its weights must be resident); the
    gates and counts are returned on the CPU."""
    acts = layer_activations(runner, block, scale)
    gates, counts = fixed_gates(block, acts.x)
    if options.expert_selector == "greedy":
        found = greedy_experts(block, acts, gates, k, metric, memory)
    else:
        counts = counts.cpu()
        chosen = select_experts(options.expert_selector, block, counts, k, options.seed)
        found = ExpertSearchResult(layer=block.layer_idx, experts=chosen, gates=tuple(gates.cpu()[list(chosen)].tolist()))
        found.step_scores = [layer_divergence(block, acts, chosen, gates, metric)] if k else []
        found.shared_only_score = layer_divergence(block, acts, (), gates, metric)
    return found, counts.cpu(), gates.cpu()
