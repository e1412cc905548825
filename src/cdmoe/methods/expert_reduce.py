"""Fewer routed experts per MoE layer: the plan (a mixing matrix per layer) and applying it.

Expert Drop (:mod:`cdmoe.methods.expert_drop`) and M-SMoE (:mod:`cdmoe.methods.msmoe`) make plans;
:func:`reduce_experts` applies one with the router restricted to the kept rows (a native checkpoint),
:func:`merge_experts` with the full router and an id map E -> E'_l (cdmoe format).

Each layer's plan is one mixing matrix M (E', E): new expert j = sum_e M[j, e] * expert e, plus
either the router rows kept (Expert Drop, restricted M-SMoE) or the map E -> E' (M-SMoE).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CdmoeError
from ..models.adapter import MoEBlock, attr_path, family_spec, moe_blocks
from ..models.condensed import to_cdmoe_format
from ..models.modeling_cdmoe import merge_routed_experts

__all__ = ["ExpertPlan", "check_kept", "keep_top_plans", "merge_experts", "reduce_experts"]


@dataclass(frozen=True)
class ExpertPlan:
    """One layer's new experts: ``mix`` (E', E) weights over old experts, and either
    ``router_rows`` (E',) the router keeps or, with the full router kept, ``expert_map`` (E,)
    the merged expert each old expert's id is routed to."""

    layer: int
    mix: torch.Tensor
    router_rows: tuple[int, ...] | None
    expert_map: tuple[int, ...] | None = None

    def to_dict(self) -> dict:
        groups = [[(e, round(float(w), 6)) for e, w in enumerate(row.tolist()) if w] for row in self.mix]
        out = {"layer": self.layer, "groups": groups}
        if self.router_rows is not None:
            out["router_rows"] = list(self.router_rows)
        if self.expert_map is not None:
            out["expert_map"] = list(self.expert_map)
        return out


def check_kept(block: MoEBlock, kept: int) -> None:
    if not block.top_k <= kept <= block.num_experts:
        raise CdmoeError(f"--keep-experts {kept} is out of range for layer {block.layer_idx}: it needs top-k "
                         f"({block.top_k}) <= E' <= {block.num_experts}")
    n_group = getattr(block.config, "n_group", 1) or 1
    if block.spec.routing.group_score is not None and n_group > 1:
        raise CdmoeError("Expert Drop / M-SMoE with group-limited routing (n_group > 1) is not supported")


def keep_top_plans(model: nn.Module, scores: dict[int, torch.Tensor], kept: int) -> list[ExpertPlan]:
    """Plans keeping the ``kept`` experts of each MoE layer with the highest ``scores[layer]`` (E,)
    (ties: lower id), router restricted to their rows (Expert Drop, REAP)."""
    plans = []
    for block in moe_blocks(model):
        check_kept(block, kept)
        layer = scores[block.layer_idx]
        keep = sorted(sorted(range(block.num_experts), key=lambda e: (-float(layer[e]), e))[:kept])
        mix = torch.zeros(kept, block.num_experts, dtype=torch.float64)
        mix[torch.arange(kept), torch.tensor(keep)] = 1.0
        plans.append(ExpertPlan(block.layer_idx, mix, tuple(keep)))
    return plans


def _expert_stacks(block: MoEBlock, prefix: str) -> dict[str, torch.Tensor]:
    """State-dict keys of the routed experts mapped to (E, ...) stacks (fused or one module per expert)."""
    experts = block.experts
    if block.fused:
        return {f"{prefix}{name}": p for name, p in experts.named_parameters() if p.shape[0] == block.num_experts}
    names = [name for name, _ in experts[0].named_parameters()]
    return {f"{prefix}{{}}.{name}": torch.stack([attr_path(experts[e], name) for e in range(block.num_experts)])
            for name in names}


def _merged_tensors(block: MoEBlock, mix: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """{state-dict key: tensor} of the E' new experts sum_e mix[j, e] * expert e (float64 sums,
    cast back to the experts' dtype), keys named for E' experts under ``prefix``."""
    out = {}
    for pattern, stack in _expert_stacks(block, prefix).items():
        merged = torch.einsum("je,e...->j...", mix.to(torch.float64), stack.detach().double()).to(stack.dtype)
        out.update({pattern.format(j): merged[j] for j in range(len(merged))} if "{}" in pattern else {pattern: merged})
    return out


def reduce_experts(model: nn.Module, plans: list[ExpertPlan]) -> nn.Module:
    """A new model of the same family with E' = len(plan.router_rows) routed experts per MoE layer."""
    spec = family_spec(model)
    blocks = {b.layer_idx: b for b in moe_blocks(model, spec)}
    kept = {len(p.router_rows) for p in plans if p.router_rows is not None}
    if len(kept) != 1 or {p.layer for p in plans} != set(blocks) or any(p.router_rows is None for p in plans):
        raise CdmoeError("every MoE layer needs a plan with the same number of experts")
    new_e = kept.pop()
    key = next((k for k in spec.num_experts_keys if getattr(model.config, k, None) is not None), None)
    if key is None:
        raise CdmoeError(f"cannot find the expert count in the config (looked for {', '.join(spec.num_experts_keys)})")
    state = model.state_dict()
    for plan in plans:
        block = blocks[plan.layer]
        base = f"{spec.layers_path}.{plan.layer}.{spec.block_attr}."
        rows = torch.tensor(plan.router_rows)
        for name, tensor in _router_tensors(block):
            full = f"{base}{spec.router_attr}.{name}"
            if full not in state:  # non-persistent buffer
                continue
            dim = 0 if tensor.shape[0] == block.num_experts else tensor.dim() - 1
            state[full] = tensor.index_select(dim, rows)
        prefix = f"{base}{spec.experts_attr}."
        for old in _expert_stacks(block, prefix):
            for e in range(block.num_experts) if "{}" in old else ():
                state.pop(old.format(e))
        state.update(_merged_tensors(block, plan.mix, prefix))
    config = copy.deepcopy(model.config)  # keeps runtime settings such as _attn_implementation
    setattr(config, key, new_e)  # through the config's attribute_map (qwen3_moe: num_experts -> num_local_experts)
    new = type(model)._from_config(config, dtype=model.dtype)
    new.load_state_dict(state, strict=True)
    return new.eval()


@torch.no_grad()
def merge_experts(model: nn.Module, plans: list[ExpertPlan]) -> nn.Module:
    """M-SMoE's merged layers in place (cdmoe format): layer l keeps its full router and stores
    E'_l = len(plan.mix) experts; the router's top-k ids go through ``plan.expert_map`` (E,)."""
    spec = family_spec(model)
    blocks = {b.layer_idx: b for b in moe_blocks(model, spec)}
    if {p.layer for p in plans} != set(blocks) or any(p.expert_map is None for p in plans):
        raise CdmoeError("every MoE layer needs a merge plan with an expert map")
    entries = {}
    for plan in plans:
        block = blocks[plan.layer]
        merged = _merged_tensors(block, plan.mix, "")
        merge_routed_experts(block.module, spec.experts_attr, spec.router_attr, plan.expert_map)
        experts = getattr(block.module, spec.experts_attr)
        missing, unexpected = experts.load_state_dict(merged, strict=False)
        if unexpected or set(missing) & set(dict(experts.named_parameters())):
            raise CdmoeError(f"layer {plan.layer}: the merged experts do not fit the experts module")
        entries[str(plan.layer)] = {"num_experts": len(plan.mix), "expert_map": list(plan.expert_map)}
    previous = (getattr(model.config, "cdmoe", None) or {}).get("merged_experts", {})
    return to_cdmoe_format(model, {"router_attr": spec.router_attr, "merged_experts": {**previous, **entries}})


def _router_tensors(block: MoEBlock):
    """(name, tensor) of the router's parameters and persistent buffers that have an expert axis."""
    router = block.router
    for name, tensor in list(router.named_parameters()) + [
        (n, b) for n, b in router.named_buffers() if b is not None
    ]:
        if block.num_experts in (tensor.shape[0], tensor.shape[-1]):
            yield name, tensor.detach()
