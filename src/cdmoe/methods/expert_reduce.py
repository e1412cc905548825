"""Fewer routed experts per MoE layer: Expert Drop and M-SMoE merging (two variants).

- **Expert Drop** keeps the E' experts with the highest summed routing probability on the
  calibration tokens; the router keeps their rows, so a token's gates are renormalised
  over the kept experts exactly as the family's router does over all of them. The result is
  the family's own architecture with E' experts in ``config.json`` (a native checkpoint).
- **M-SMoE** (``msmoe``; Li et al., arXiv 2310.01334), as the reference implementation
  MC-SMoE (``mcsmoe/merging/grouping_mixtral.py``) runs it:

  1. usage frequency f_l (E,) per layer: how often the router's top-k chose each expert on
     the calibration tokens, normalised to sum 1 per layer (``compute_all_usages``; MC-SMoE
     takes the top-2 of the router logits, cdmoe the family's own top-k choice);
  2. per-layer group counts from one global threshold (``_assign_num_groups_per_layer``):
     each layer's most used expert gets usage 1, all L*E usages are sorted descending, the
     threshold is the value at position E'*L (E'*L - 1 when E' = E), and layer l gets
     E'_l = #{e : f_l[e] > threshold} groups, so E'_l varies and sums to about E'*L;
  3. the E'_l most used experts are the groups' cores; every other expert joins the core
     whose router logits over the tokens are most similar, cosine ((cos + 1) / 2 in MC-SMoE,
     the same argmax) (``_compute_all_similarities_by_router_logits``,
     ``group_experts_globally_from_dominant_experts``);
  4. each group becomes one expert, the average of its members' weights weighted by usage
     (``_merge_mlp_experts_by_usage_frequency_weighting``; MC-SMoE divides by the sum + 1e-6:
     cdmoe by the sum). As there, no neuron permutation alignment is done (MC-SMoE's
     Switch-Transformer path has one, ``mcsmoe/merging/permutation.py``; its Mixtral path not);
  5. the full router is kept and every member is bound to its merged expert (MC-SMoE makes
     the members the same module): a token picks top-k over all E experts with the family's
     gates and each chosen id is mapped to its group's expert. Stored as a cdmoe-format
     checkpoint whose config holds the per-layer expert maps (``merged_experts``).

- **M-SMoE, router restricted** (``msmoe-restricted``, cdmoe's earlier variant): E' groups in
  every layer around its E' most used experts, grouped and merged as above, but the router
  keeps only the cores' rows (gates renormalised over E' experts, members no longer reached
  through their own rows); a native checkpoint like Expert Drop.

Each layer's plan is one mixing matrix M (E', E): new expert j = sum_e M[j, e] * expert e, plus
either the router rows kept (Expert Drop, restricted M-SMoE) or the map E -> E' (M-SMoE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CdmoeError
from ..models.adapter import MoEBlock, attr_path, family_spec, moe_blocks
from ..models.condensed import to_cdmoe_format
from ..models.modeling_cdmoe import merge_routed_experts
from .calib_stats import CalibStats

__all__ = ["ExpertPlan", "expert_drop_plans", "global_group_counts", "merge_experts", "msmoe_plans",
           "msmoe_restricted_plans", "reduce_experts", "usage_frequencies"]


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


def usage_frequencies(stats: CalibStats) -> dict[int, torch.Tensor]:
    """{MoE layer: (E,) float64 top-k selection counts / their sum} (MC-SMoE's ``compute_all_usages``)."""
    return {i: c.double() / c.sum().clamp_min(1) for i, c in stats.counts.items()}


def global_group_counts(usage: dict[int, torch.Tensor], kept: int) -> dict[int, int]:
    """E'_l per layer from one global usage threshold, MC-SMoE's ``_assign_num_groups_per_layer``
    (every layer merged): ``kept`` is the average E', ``usage`` {layer: (E,) frequencies}."""
    boosted = {}
    for layer, f in usage.items():
        f = f.double().clone()
        f[int(f.argmax())] = 1.0  # every layer keeps at least its most used expert
        boosted[layer] = f
    ranked = torch.cat(list(boosted.values())).sort(descending=True).values
    total = kept * len(boosted) - (1 if all(kept == f.numel() for f in boosted.values()) else 0)
    threshold = float(ranked[total])
    if threshold == 1.0:
        raise CdmoeError(f"--keep-experts {kept} is too large for M-SMoE's global threshold; use fewer experts")
    return {layer: int((f > threshold).sum()) for layer, f in boosted.items()}


def _by_usage(counts: torch.Tensor) -> list[int]:
    """Expert ids, most used first (ties: lower id)."""
    return sorted(range(counts.numel()), key=lambda e: (-float(counts[e]), e))


def _group(counts: torch.Tensor, similarity: torch.Tensor, n: int) -> tuple[list[int], list[int]]:
    """(cores (n,) ascending, expert_map (E,)): the n most used experts are the cores (group j =
    the j-th core by id); every other expert joins the core of highest ``similarity`` (E, E)
    (ties: the more used core), as ``group_experts_globally_from_dominant_experts``."""
    ranked = _by_usage(counts)[:n]
    cores = sorted(ranked)
    expert_map = [cores.index(ranked[int(similarity[e, ranked].argmax())]) for e in range(counts.numel())]
    for j, core in enumerate(cores):
        expert_map[core] = j
    return cores, expert_map


def _usage_mix(counts: torch.Tensor, expert_map: list[int]) -> torch.Tensor:
    """(E', E) float64: each group's usage-weighted average (a group nobody used: plain average)."""
    n = max(expert_map) + 1
    member = torch.zeros(n, counts.numel(), dtype=torch.float64)
    member[torch.tensor(expert_map), torch.arange(counts.numel())] = 1.0
    mix = member * counts.double()
    total = mix.sum(1, keepdim=True)
    return torch.where(total > 0, mix / total.clamp_min(1e-300), member / member.sum(1, keepdim=True))


def msmoe_plans(model: nn.Module, stats: CalibStats, kept: int) -> list[ExpertPlan]:
    """M-SMoE as MC-SMoE runs it (see the module docstring): E'_l groups per layer from the global
    threshold for an average of ``kept``, full router, each old expert mapped to its group's expert."""
    blocks = moe_blocks(model)
    for block in blocks:
        _check_kept(block, kept)
    groups = global_group_counts(usage_frequencies(stats), kept)
    plans = []
    for block in blocks:
        counts = stats.counts[block.layer_idx]
        _, expert_map = _group(counts, stats.logit_similarity(block.layer_idx), groups[block.layer_idx])
        plans.append(ExpertPlan(block.layer_idx, _usage_mix(counts, expert_map), None, tuple(expert_map)))
    return plans


def msmoe_restricted_plans(model: nn.Module, stats: CalibStats, kept: int) -> list[ExpertPlan]:
    """The restricted variant: ``kept`` groups in every layer, router restricted to the cores' rows."""
    plans = []
    for block in moe_blocks(model):
        _check_kept(block, kept)
        counts = stats.counts[block.layer_idx]
        cores, expert_map = _group(counts, stats.logit_similarity(block.layer_idx), kept)
        plans.append(ExpertPlan(block.layer_idx, _usage_mix(counts, expert_map), tuple(cores)))
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
    config = type(model.config).from_dict({**model.config.to_dict(), key: new_e})
    for name, value in vars(model.config).items():  # runtime settings such as _attn_implementation
        if name.startswith("_"):
            config.__dict__[name] = value
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
