"""Expert Drop: keeps the E' experts with the highest summed routing probability on the
calibration tokens; the router keeps their rows, so a token's gates are renormalised
over the kept experts exactly as the family's router does over all of them. The result is
the family's own architecture with E' experts in ``config.json`` (a native checkpoint).
"""

from __future__ import annotations

from torch import nn

from .calib_stats import CalibStats
from .expert_reduce import ExpertPlan, keep_top_plans

__all__ = ["expert_drop_plans"]


def expert_drop_plans(model: nn.Module, stats: CalibStats, kept: int) -> list[ExpertPlan]:
    """Keep the ``kept`` experts of each layer with the highest summed routing score (ties: lower id)."""
    return keep_top_plans(model, stats.score_sums, kept)
