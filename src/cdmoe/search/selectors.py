"""Alternatives to the greedy searches, for the paper's ablations (Tables 2 and 4).

Expert selectors (which K routed experts a condensed layer keeps):

- ``greedy``: Algorithm 1 (default).
- ``random``: K experts drawn with a seeded generator.
- ``l1``: the K experts with the lowest L1 norm of their weights (gate, up and down summed),
  the paper's *L1* baseline ("lower norms often indicate better-converged parameters").
- ``frequency``: the K experts the calibration tokens selected most often.
- ``pl-alpha-hill``: the K experts whose weights are most heavy-tailed, i.e. the lowest
  PL_Alpha_Hill (Eq. 6) of the eigen-spectrum of W^T W, averaged over the expert's gate,
  up and down matrices; k of Eq. 6 by Fix-Finger (x_min at the peak of the log-spectrum
  histogram, Yang et al. 2023).

Layer selectors (which N MoE layers to condense):

- ``greedy``: Algorithm 2 (default).
- ``layer-rank``: the N layers whose own output moves least when condensed (the layer-level
  divergence after expert selection), the paper's *Layer Rank*.
- ``global-layer-rank``: the N layers whose condensation alone moves the model's final output
  least (Algorithm 2's first step, ranked), the paper's *Global Layer Rank*.
"""

from __future__ import annotations

import torch

from ..models.adapter import MoEBlock

__all__ = ["EXPERT_SELECTORS", "LAYER_SELECTORS", "expert_alphas", "expert_l1_norms", "hill_alpha", "rank_layers",
           "select_experts"]

EXPERT_SELECTORS = ("greedy", "random", "l1", "frequency", "pl-alpha-hill")
LAYER_SELECTORS = ("greedy", "layer-rank", "global-layer-rank")


@torch.no_grad()
def expert_l1_norms(block: MoEBlock) -> torch.Tensor:
    """Sum of |w| over each routed expert's gate, up and down weights: (E,)."""
    return torch.tensor([sum(float(w.float().abs().sum()) for w in block.expert_weights(e))
                         for e in range(block.num_experts)])


def hill_alpha(eigenvalues: torch.Tensor, bins: int = 100) -> float:
    """PL_Alpha_Hill (Eq. 6): 1 + k / sum_{i<=k} ln(lambda_{n-i+1} / lambda_{n-k}).

    ``eigenvalues`` (n,) of W^T W. Fix-Finger: lambda_{n-k} = x_min, the smallest eigenvalue at
    or above the left edge of the fullest bin of a ``bins``-bin histogram of log10 eigenvalues.
    """
    lam = eigenvalues.double().clamp_min(0).sort().values
    lam = lam[lam > lam[-1] * 1e-12]
    if lam.numel() < 3:
        return float("nan")
    logs = lam.log10()
    counts = torch.histc(logs, bins=bins, min=float(logs[0]), max=float(logs[-1]))
    edge = float(logs[0]) + int(counts.argmax()) * (float(logs[-1]) - float(logs[0])) / bins
    start = min(int((logs < edge).sum()), lam.numel() - 2)  # index of x_min = lambda_{n-k}
    tail = lam[start + 1:]
    return 1.0 + tail.numel() / float((tail / lam[start]).log().sum())


@torch.no_grad()
def expert_alphas(block: MoEBlock) -> torch.Tensor:
    """Mean PL_Alpha_Hill over each routed expert's gate, up and down weights: (E,)."""
    def alpha(w: torch.Tensor) -> float:
        return hill_alpha(torch.linalg.svdvals(w.double()) ** 2)

    return torch.tensor([sum(alpha(w) for w in block.expert_weights(e)) / 3 for e in range(block.num_experts)])


def select_experts(selector: str, block: MoEBlock, counts: torch.Tensor, k: int, seed: int = 0) -> tuple[int, ...]:
    """K routed experts of ``block`` by a non-greedy ``selector`` (ties: lower index first)."""
    if selector == "random":
        gen = torch.Generator().manual_seed(seed * 100_003 + block.layer_idx)
        return tuple(torch.randperm(block.num_experts, generator=gen)[:k].tolist())
    if selector == "l1":
        scores = expert_l1_norms(block)
    elif selector == "pl-alpha-hill":
        scores = expert_alphas(block)
    elif selector == "frequency":
        scores = -counts.double()
    else:
        raise ValueError(f"unknown expert selector {selector!r}")
    order = sorted(range(block.num_experts), key=lambda e: (float(scores[e]), e))
    return tuple(order[:k])


def rank_layers(scores: dict[int, float], n: int) -> list[int]:
    """The ``n`` layers with the smallest score, smallest first (ties: lower index)."""
    return sorted(scores, key=lambda layer: (scores[layer], layer))[:n]
