"""Fewer routed experts per MoE layer, router kept: Expert Drop and M-SMoE merging.

Both baselines turn every sparse MoE layer's E routed experts into E' experts and keep
a router restricted to E' rows, so the result is the family's own architecture with a
smaller expert count in ``config.json`` (a native checkpoint, no custom code):

- **Expert Drop** keeps the E' experts with the highest summed routing probability on the
  calibration tokens; the router keeps their rows, so a token's gates are renormalised
  over the kept experts exactly as the family's router does over all of them.
- **M-SMoE** (Li et al., 2310.01334) takes the E' most used experts as *dominant*, puts
  every other expert in the group of the dominant expert whose router logits (over the
  calibration tokens) are most similar (cosine), and replaces each group by the average of
  its members weighted by how often tokens chose them. The router keeps the dominant
  experts' rows. (M-SMoE's neuron permutation alignment before averaging is not done.)

Both are one mixing matrix M (E', E) per layer: new expert j = sum_e M[j, e] * expert e,
and one router row index per new expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CdmoeError
from ..models.adapter import MoEBlock, attr_path, family_spec, moe_blocks
from .calib_stats import CalibStats

__all__ = ["ExpertPlan", "expert_drop_plans", "msmoe_plans", "reduce_experts"]


@dataclass(frozen=True)
class ExpertPlan:
    """One layer's new experts: ``mix`` (E', E) weights over old experts, ``router_rows`` (E',)."""

    layer: int
    mix: torch.Tensor
    router_rows: tuple[int, ...]

    def to_dict(self) -> dict:
        groups = [[(e, round(float(w), 6)) for e, w in enumerate(row.tolist()) if w] for row in self.mix]
        return {"layer": self.layer, "router_rows": list(self.router_rows), "groups": groups}


def _check_kept(block: MoEBlock, kept: int) -> None:
    if not block.top_k <= kept <= block.num_experts:
        raise CdmoeError(f"--keep-experts {kept} is out of range for layer {block.layer_idx}: it needs top-k "
                         f"({block.top_k}) <= E' <= {block.num_experts}")
    n_group = getattr(block.config, "n_group", 1) or 1
    if block.spec.routing.group_score is not None and n_group > 1:
        raise CdmoeError("Expert Drop / M-SMoE with group-limited routing (n_group > 1) is not supported")


def expert_drop_plans(model: nn.Module, stats: CalibStats, kept: int) -> list[ExpertPlan]:
    """Keep the ``kept`` experts of each layer with the highest summed routing score (ties: lower id)."""
    plans = []
    for block in moe_blocks(model):
        _check_kept(block, kept)
        scores = stats.score_sums[block.layer_idx]
        keep = sorted(sorted(range(block.num_experts), key=lambda e: (-float(scores[e]), e))[:kept])
        mix = torch.zeros(kept, block.num_experts, dtype=torch.float64)
        mix[torch.arange(kept), torch.tensor(keep)] = 1.0
        plans.append(ExpertPlan(block.layer_idx, mix, tuple(keep)))
    return plans


def msmoe_plans(model: nn.Module, stats: CalibStats, kept: int) -> list[ExpertPlan]:
    """M-SMoE groups (dominant = most used; others join the most similar dominant) and usage weights."""
    plans = []
    for block in moe_blocks(model):
        _check_kept(block, kept)
        counts = stats.counts[block.layer_idx].double()
        dominant = sorted(sorted(range(block.num_experts), key=lambda e: (-float(counts[e]), e))[:kept])
        similarity = stats.logit_similarity(block.layer_idx)[:, dominant]  # (E, E')
        group = similarity.argmax(1)
        group[torch.tensor(dominant)] = torch.arange(kept)
        mix = torch.zeros(kept, block.num_experts, dtype=torch.float64)
        for e in range(block.num_experts):
            mix[group[e], e] = counts[e]
        for j in range(kept):  # groups nobody used: plain average
            members = group == j
            total = mix[j].sum()
            mix[j] = mix[j] / total if total > 0 else members.double() / members.sum()
        plans.append(ExpertPlan(block.layer_idx, mix, tuple(dominant)))
    return plans


def _expert_stacks(block: MoEBlock, prefix: str) -> dict[str, torch.Tensor]:
    """State-dict keys of the routed experts mapped to (E, ...) stacks (fused or one module per expert)."""
    experts = block.experts
    if block.fused:
        return {f"{prefix}{name}": p for name, p in experts.named_parameters() if p.shape[0] == block.num_experts}
    names = [name for name, _ in experts[0].named_parameters()]
    return {f"{prefix}{{}}.{name}": torch.stack([attr_path(experts[e], name) for e in range(block.num_experts)])
            for name in names}


def reduce_experts(model: nn.Module, plans: list[ExpertPlan]) -> nn.Module:
    """A new model of the same family with E' = len(plan.router_rows) routed experts per MoE layer."""
    spec = family_spec(model)
    blocks = {b.layer_idx: b for b in moe_blocks(model, spec)}
    kept = {len(p.router_rows) for p in plans}
    if len(kept) != 1 or {p.layer for p in plans} != set(blocks):
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
        for pattern, stack in _expert_stacks(block, f"{base}{spec.experts_attr}.").items():
            merged = torch.einsum("je,e...->j...", plan.mix.to(torch.float64), stack.double()).to(stack.dtype)
            if "{}" in pattern:
                for e in range(block.num_experts):
                    state.pop(pattern.format(e))
                state.update({pattern.format(j): merged[j] for j in range(new_e)})
            else:
                state[pattern] = merged
    config = type(model.config).from_dict({**model.config.to_dict(), key: new_e})
    for name, value in vars(model.config).items():  # runtime settings such as _attn_implementation
        if name.startswith("_"):
            config.__dict__[name] = value
    new = type(model)._from_config(config, dtype=model.dtype)
    new.load_state_dict(state, strict=True)
    return new.eval()


def _router_tensors(block: MoEBlock):
    """(name, tensor) of the router's parameters and persistent buffers that have an expert axis."""
    router = block.router
    for name, tensor in list(router.named_parameters()) + [
        (n, b) for n, b in router.named_buffers() if b is not None
    ]:
        if block.num_experts in (tensor.shape[0], tensor.shape[-1]):
            yield name, tensor.detach()
