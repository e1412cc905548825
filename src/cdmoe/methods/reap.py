"""REAP, Router-weighted Expert Activation Pruning (Lasby et al., ICLR 2026, arXiv 2510.13999).

Saliency of routed expert j of one sparse MoE layer on calibration tokens (its block inputs x):

    S_j = (1 / |X_j|) * sum_{x in X_j} g_j(x) * ||f_j(x)||_2,      X_j = {x : j is in top-k(x)}

f_j(x) (H,) is expert j's output before gating and g_j(x) its gate as the family routes
(:meth:`~cdmoe.models.adapter.MoEBlock.route`: score function, correction bias, group limits,
renormalisation), before the routed scaling factor, which REAP's code never applies (a constant
of the model, it changes no ranking). An expert no token chose has S_j = 0. The sum runs over
every calibration token, so S_j is the mean over all of X_j, not a mean of per-batch means
(REAP's ``OnlineStatsTracker`` weights each batch by its count, which is the same).

REAP keeps the E' most salient experts of every layer, router restricted to their rows: the
plans of :func:`reap_plans` go to :func:`~cdmoe.methods.expert_reduce.reduce_experts` (a
native checkpoint). :func:`expert_saliency` is one layer's statistic from that layer's inputs
alone, so a caller holding cached layer inputs (sequential mode) can use it per layer.
Where cdmoe's gates differ from the authors' code: README, "Baselines".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CdmoeError
from ..models.adapter import MoEBlock, Routing, moe_blocks
from .expert_reduce import ExpertPlan, keep_top_plans

__all__ = ["ExpertSaliency", "expert_saliency", "reap_plans"]


@dataclass
class ExpertSaliency:
    """One MoE layer's REAP accumulators: ``sums`` (E,) float64, sum over the tokens routed to each
    expert of g * ||f||_2; ``counts`` (E,) long, those tokens. Both live on the device they were made on."""

    sums: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def zeros(cls, num_experts: int, device: torch.device | str | None = None) -> ExpertSaliency:
        return cls(torch.zeros(num_experts, dtype=torch.float64, device=device),
                   torch.zeros(num_experts, dtype=torch.long, device=device))

    def add_(self, other: ExpertSaliency) -> ExpertSaliency:
        self.sums += other.sums.to(self.sums.device)
        self.counts += other.counts.to(self.counts.device)
        return self

    def mean(self) -> torch.Tensor:
        """S (E,) float64 on the CPU: sums / counts, 0 for an expert no token chose."""
        return self.sums.cpu() / self.counts.cpu().clamp(min=1)

    def to_dict(self) -> dict:
        return {"saliency": [float(f"{s:.6g}") for s in self.mean().tolist()], "token_counts": self.counts.tolist()}


def _token_chunk(block: MoEBlock, budget_bytes: int) -> int:
    """Tokens per chunk so that one chunk's fp32 temporaries (router logits and scores (c, E), the
    rows of one expert (c, H), its intermediate activations (c, 3I) and output (c, H)) fit ``budget_bytes``."""
    hidden, inter = block.router_weight.shape[1], block.expert_intermediate_size
    return max(1, budget_bytes // (4 * (2 * block.num_experts + 2 * hidden + 3 * inter)))


def _routed_sums(block: MoEBlock, x: torch.Tensor, routing: Routing) -> ExpertSaliency:
    """The accumulators of x (c, H) routed as ``routing``: each expert runs once, on its own tokens only."""
    num_experts, top_k = block.num_experts, routing.indices.shape[1]
    chosen = routing.indices.reshape(-1)  # (c*K,) expert of each (token, slot) pair
    gates = (routing.gates.double() / block.routed_scale).reshape(-1)  # (c*K,) g before routed scaling
    token = torch.arange(x.shape[0], device=x.device).repeat_interleave(top_k)  # (c*K,) token of each pair
    order = torch.argsort(chosen, stable=True)
    counts = torch.bincount(chosen, minlength=num_experts)
    sums = torch.zeros(num_experts, dtype=torch.float64, device=x.device)
    start = 0
    for e, end in enumerate(counts.cumsum(0).tolist()):
        if end > start:
            pairs = order[start:end]
            norms = block.expert_output(e, x[token[pairs]]).float().norm(dim=-1)  # ||f_e(x)||_2, ungated
            sums[e] = (gates[pairs] * norms.double()).sum()
        start = end
    return ExpertSaliency(sums, counts)


@torch.no_grad()
def expert_saliency(block: MoEBlock, x: torch.Tensor, budget_bytes: int = 256 * 2**20) -> ExpertSaliency:
    """REAP's accumulators of one MoE layer over its block inputs x (..., H): one pass over the tokens,
    in chunks whose temporaries stay under ``budget_bytes``, on x's device (the layer's weights must be there)."""
    x = x.reshape(-1, x.shape[-1])
    out = ExpertSaliency.zeros(block.num_experts, x.device)
    step = _token_chunk(block, budget_bytes)
    for start in range(0, x.shape[0], step):
        chunk = x[start : start + step]
        out.add_(_routed_sums(block, chunk, block.route(chunk)))
    return out


def reap_plans(model: nn.Module, saliency: dict[int, ExpertSaliency], kept: int) -> list[ExpertPlan]:
    """Keep the ``kept`` experts of each MoE layer with the highest REAP saliency (ties: lower id)."""
    missing = [b.layer_idx for b in moe_blocks(model) if b.layer_idx not in saliency]
    if missing:
        raise CdmoeError(f"no REAP saliency for MoE layers {missing}: compute it with "
                         "calibration_stats(..., reap=True)")
    return keep_top_plans(model, {layer: s.mean() for layer, s in saliency.items()}, kept)
