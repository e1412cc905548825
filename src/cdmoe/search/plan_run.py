"""The budget planner end to end in the search stage: per MoE layer gates (Eq. 2), Algorithm 1 and the
expert saliency, the layers' ladders, then the greedy search (:mod:`cdmoe.search.planner`).

    runner  = one forward pass per calibration batch, caching every MoE layer's input
    per MoE layer l (its weights loaded once): X, block and layer outputs on its cached input;
        gates g_i (Eq. 2); Algorithm 1's greedy order of top-k routed experts; saliency(block, X)
    ladders: keep, prune levels (most salient experts kept), condense K = top-k..K_min, drop; bytes of each
    greedy_plan over the ladders until every budget is met

``saliency`` is given by the caller (REAP's, :func:`cdmoe.methods.reap.expert_saliency`, in the methods
stage). The model is left unchanged; the result holds each budget's plan ({layer: action}) and the record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from torch import nn

from ..errors import CdmoeError
from ..models.adapter import MoEBlock, family_spec, moe_blocks
from ..models.byte_budget import ByteTable
from ..models.mixed import KEEP, LayerAction, build_block, prune_sizes, salient_experts
from .expert_search import SearchMemory, fixed_gates, greedy_experts
from .plan_state import PlanState
from .planner import Ladder, Rung, greedy_plan, plan_of_steps
from .run import calibrate, layer_activations

__all__ = ["PlanOptions", "PlanResult", "check_budgets", "run_plan"]


@dataclass(frozen=True)
class PlanOptions:
    budgets: tuple[float, ...]  # ratios of the original weight bytes, each a ceiling
    metric: str = "js"  # js | kl | ppl, of the final output (Algorithm 1 uses js for ppl)
    final: str = "hidden"  # hidden | logits
    batch_size: int = 8
    cache_bytes: int = 2 * 2**30
    prune_fractions: tuple[float, ...] = (0.75, 0.5, 0.25)  # E_l = fraction * E, rounded

    def check(self) -> None:
        """The checks that need no model (run before anything is loaded)."""
        if not self.budgets or not all(0 < b <= 1 for b in self.budgets):
            raise CdmoeError(f"--budget takes ratios of the original weight bytes in (0, 1], got {list(self.budgets)}")
        if self.batch_size < 1:
            raise CdmoeError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.metric not in ("js", "kl", "ppl"):
            raise CdmoeError(f"unknown --metric {self.metric!r}; use js, kl or ppl")
        if self.final not in ("hidden", "logits"):
            raise CdmoeError(f"unknown --final {self.final!r}; use hidden or logits")
        if not all(0 < f < 1 for f in self.prune_fractions):
            raise CdmoeError(f"prune levels are fractions of E in (0, 1), got {list(self.prune_fractions)}")


@dataclass
class PlanResult:
    plans: dict[float, dict[int, LayerAction]]  # budget ratio -> {MoE layer: action}
    steps: dict[float, list[dict]]  # budget ratio -> the steps of its plan
    predicted: dict[float, int]  # budget ratio -> predicted bytes of its output (tensors + header bound)
    tensor_bytes: dict[float, int]  # budget ratio -> the tensor bytes of its output, exactly
    record: dict = field(default_factory=dict)


def check_budgets(table: ByteTable, original_bytes: int, budgets) -> dict[float, int]:
    """{ratio: budget bytes}, refusing a budget below the smallest plan (every MoE sub-layer dropped)."""
    out = {b: int(b * original_bytes) for b in budgets}
    floor = table.total({layer: LayerAction("drop") for layer in table.blocks})
    low = [b for b, n in out.items() if n < floor]
    if low:
        raise CdmoeError(f"--budget {min(low):g} is below what any plan reaches: with every MoE sub-layer dropped the "
                         f"weights take {floor / original_bytes:.3f} of the original's {original_bytes:,} bytes; "
                         "pass a larger budget")
    return out


def _ladder(table: ByteTable, block: MoEBlock, order: tuple[int, ...], gates: torch.Tensor, saliency: torch.Tensor,
            fractions) -> tuple[Ladder, str | None]:
    """Layer ``block``'s rungs: keep, prune levels, condense K = len(order)..K_min, drop."""
    layer = block.layer_idx
    sizes, why = prune_sizes(block, tuple(fractions))
    actions = [KEEP] + [LayerAction("prune", salient_experts(saliency, s, block.routing_groups)) for s in sizes]
    k_min = 0 if block.shared is not None else 1
    actions += [LayerAction("condense", order[:k], tuple(float(gates[e]) for e in order[:k]))
                for k in range(len(order), k_min - 1, -1)]
    actions.append(LayerAction("drop"))
    return Ladder(layer, [Rung(a, table.action(layer, a)) for a in actions], prunes=len(sizes)), why


def run_plan(model: nn.Module, calib_ids: torch.Tensor, options: PlanOptions, table: ByteTable,
             original_bytes: int, saliency: Callable[[MoEBlock, torch.Tensor], torch.Tensor],
             progress: Callable[[str, int, int], None] | None = None, store=None, state: PlanState | None = None,
             activations=None) -> PlanResult:
    """Plan ``options.budgets`` for ``model`` (see the module docstring). ``table``: the bytes of every
    action; ``original_bytes``: what the budgets are ratios of; ``store``/``state``/``activations`` as
    :func:`~cdmoe.search.run.run_search` takes them."""
    options.check()
    budget_bytes = check_budgets(table, original_bytes, options.budgets)
    spec = family_spec(model)
    blocks = moe_blocks(model, spec)
    report = progress or (lambda stage, done, total: None)
    ready = calibrate(model, spec, blocks, calib_ids, options.batch_size, options.metric, store, activations)
    runner, store, scale, expert_metric, timings = ready.runner, ready.store, ready.scale, ready.expert_metric, ready.timings
    t0 = time.perf_counter()
    ladders, notes, per_layer = {}, {}, {}
    for i, block in enumerate(blocks):
        layer = block.layer_idx
        done = state.expert_layer(layer) if state is not None else None
        salient = state.saliency(layer) if state is not None else None
        if done is None or salient is None:
            with store.resident(layer):
                acts = layer_activations(runner, block, scale)
                gates, counts = fixed_gates(block, acts.x)
                found = greedy_experts(block, acts, gates, block.top_k, expert_metric,
                                       SearchMemory(cache_bytes=options.cache_bytes))
                salient = saliency(block, acts.x).double().cpu()
                del acts
            if state is not None:
                state.save_layer(layer, found, counts, gates, salient)
        else:
            found, counts, gates = done
        ladders[layer], why = _ladder(table, block, found.experts, gates, salient, options.prune_fractions)
        if why:
            notes[str(layer)] = why
        per_layer[layer] = (found, counts, gates, salient)
        report("experts", i + 1, len(blocks))
    timings["expert_search_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()

    def set_rung(layer: int, i: int) -> None:  # the module is built from the original block when swapped in
        action = ladders[layer].rungs[i].action
        store.set_condensed(layer, None if action.kind == "keep" else partial(build_block, action=action))

    scored = {"n": 0}

    def on_candidate(n: int) -> None:
        scored["n"] += n
        report("plan", scored["n"], 0)

    try:
        progress_ = greedy_plan(runner, ladders, table.fixed, sorted(set(budget_bytes.values())), set_rung,
                                "logits" if options.metric == "ppl" else options.final, options.metric, on_candidate,
                                resume=state.plan_progress() if state is not None else None,
                                checkpoint=state.save_plan_progress if state is not None else None,
                                shared_passes=store.sequential)
    finally:
        for layer in ladders:
            store.set_condensed(layer, None)
    timings["plan_search_s"] = time.perf_counter() - t0

    plans, steps, predicted, tensor_bytes = {}, {}, {}, {}
    for ratio, n in budget_bytes.items():
        steps[ratio] = progress_.finals[str(n)]
        plans[ratio] = plan_of_steps(ladders, steps[ratio])
        predicted[ratio] = table.total(plans[ratio])
        tensor_bytes[ratio] = table.total(plans[ratio], tensors_only=True)
    record = {
        "method": "budget",
        "metric": options.metric,
        "expert_metric": expert_metric,
        "final_distribution": "logits" if options.metric == "ppl" else options.final,
        "options": asdict(options),
        "original_bytes": original_bytes,
        "fixed_bytes": table.fixed,
        "ladders": {str(layer): ladder.to_dict() for layer, ladder in ladders.items()},
        "prune_notes": notes,
        "path": progress_.steps,
        "candidates": progress_.candidates,
        "expert_search": {
            str(layer): {"experts": list(f.experts), "gates": list(f.gates), "step_scores": f.step_scores,
                         "shared_only_score": f.shared_only_score, "all_gates": g.tolist(),
                         "token_counts": c.tolist(), "saliency": [float(f"{s:.6g}") for s in sal.tolist()]}
            for layer, (f, c, g, sal) in per_layer.items()},
        "cost": {"expert_forward_passes": sum(f.expert_passes for f, *_ in per_layer.values()),
                 "decoder_layer_passes": progress_.layer_passes, "calibration_tokens": int(calib_ids.numel()),
                 "plan_steps": len(progress_.steps),
                 "candidates_scored": sum(len(c) for c in progress_.candidates)},
        "timings": timings,
    }
    if state is not None and state.resumed:
        record["resumed"] = state.resumed
    return PlanResult(plans=plans, steps=steps, predicted=predicted, tensor_bytes=tensor_bytes, record=record)
