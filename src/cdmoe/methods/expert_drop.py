"""Expert Drop: keeps the E' experts with the highest summed routing probability on the
calibration tokens; the router keeps their rows, so a token's gates are renormalised
over the kept experts exactly as the family's router does over all of them. The result is
the family's own architecture with E' experts in ``config.json`` (a native checkpoint).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.adapter import moe_blocks
from .calib_stats import CalibStats
from .expert_reduce import ExpertPlan, check_kept

__all__ = ["expert_drop_plans"]


def expert_drop_plans(model: nn.Module, stats: CalibStats, kept: int) -> list[ExpertPlan]:
    """Keep the ``kept`` experts of each layer with the highest summed routing score (ties: lower id)."""
    plans = []
    for block in moe_blocks(model):
        check_kept(block, kept)
        scores = stats.score_sums[block.layer_idx]
        keep = sorted(sorted(range(block.num_experts), key=lambda e: (-float(scores[e]), e))[:kept])
        mix = torch.zeros(kept, block.num_experts, dtype=torch.float64)
        mix[torch.arange(kept), torch.tensor(keep)] = 1.0
        plans.append(ExpertPlan(block.layer_idx, mix, tuple(keep)))
    return plans
