"""M-SMoE merging, two variants (plans for :mod:`cdmoe.methods.expert_reduce`).

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
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CdmoeError
from ..models.adapter import moe_blocks
from .calib_stats import CalibStats
from .expert_reduce import ExpertPlan, check_kept

__all__ = ["global_group_counts", "msmoe_plans", "msmoe_restricted_plans", "usage_frequencies"]


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
        check_kept(block, kept)
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
        check_kept(block, kept)
        counts = stats.counts[block.layer_idx]
        cores, expert_map = _group(counts, stats.logit_similarity(block.layer_idx), kept)
        plans.append(ExpertPlan(block.layer_idx, _usage_mix(counts, expert_map), tuple(cores)))
    return plans
