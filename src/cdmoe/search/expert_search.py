"""Fixed gates (Eq. 2) and greedy expert selection (Algorithm 1), computed once per layer.

For one MoE layer with calibration block inputs X (T, H):

- the family's routing gives g_{i,t}; the fixed gate of expert i is the mean of g_{i,t}
  over the tokens that selected it (Eq. 2), after the family's renormalisation and
  scaling, with the token count recorded. An expert no token selected gets the mean of
  all selected gates of the layer (documented fallback, ``count = 0``).
- Algorithm 1 greedily adds the routed expert whose addition minimises the divergence
  between the original and the condensed *decoder layer output* h_t (Eq. 1 vs Eq. 3,
  both including the residual x_t; the official code compares ``hidden_states`` of that
  layer), with a softmax over the hidden dimension of each token, averaged over tokens.

Speed: the literal algorithm evaluates the layer sum_{k<K}(E-k) times (the official code
runs the whole model each time). Here each routed expert's output E_i(X) is computed
once; a candidate's condensed output is then ``base + g_i E_i(X)``, so all candidates of
a step are scored with one batched softmax. Tokens are processed in chunks that bound
memory; if the expert outputs do not fit ``cache_bytes`` they are recomputed per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models.adapter import MoEBlock
from .metrics import divergence_sum

__all__ = ["LayerActivations", "fixed_gates", "greedy_experts", "layer_divergence", "ExpertSearchResult"]


@dataclass
class LayerActivations:
    """One MoE layer on the calibration tokens: block input ``x``, block output ``y`` and
    decoder-layer output ``h`` (each (T, H)); ``residual_scale`` multiplies the block
    output before the residual add (1 except e.g. granitemoe)."""

    x: torch.Tensor
    y: torch.Tensor
    h: torch.Tensor
    residual_scale: float = 1.0


@dataclass
class ExpertSearchResult:
    layer: int
    experts: tuple[int, ...]
    gates: tuple[float, ...]
    step_scores: list[float] = field(default_factory=list)  # divergence after adding each expert
    shared_only_score: float = float("nan")  # divergence with the shared experts alone
    expert_passes: int = 0  # expert forward passes over all calibration tokens


@torch.no_grad()
def fixed_gates(block: MoEBlock, x: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2: (gates (E,), counts (E,)) from the routing of x (T, H)."""
    sums = torch.zeros(block.num_experts, dtype=torch.float64)
    counts = torch.zeros(block.num_experts, dtype=torch.long)
    for start in range(0, x.shape[0], chunk):
        routing = block.route(x[start : start + chunk])
        sums.index_add_(0, routing.indices.reshape(-1).cpu(), routing.gates.reshape(-1).double().cpu())
        counts.index_add_(0, routing.indices.reshape(-1).cpu(), torch.ones(routing.indices.numel(), dtype=torch.long))
    fallback = sums.sum() / counts.sum().clamp(min=1)
    gates = torch.where(counts > 0, sums / counts.clamp(min=1), fallback)
    return gates.float(), counts


def _token_chunk(num_candidates: int, hidden: int, budget_bytes: int = 256 * 2**20) -> int:
    return max(1, budget_bytes // (4 * max(1, num_candidates) * hidden))


@torch.no_grad()
def greedy_experts(
    block: MoEBlock,
    acts: LayerActivations,
    gates: torch.Tensor,
    k: int,
    metric: str = "js",
    cache_bytes: int = 2 * 2**30,
) -> ExpertSearchResult:
    """Algorithm 1 on one layer: choose ``k`` routed experts to keep with the shared ones."""
    x, h = acts.x, acts.h.float()
    m = acts.residual_scale
    tokens, hidden = x.shape
    num_experts = block.num_experts
    shared = block.shared_output(x)
    # condensed output so far: residual + m * (shared + sum of chosen g_i E_i(x))
    base = h - m * acts.y.float() + (m * shared.float() if shared is not None else 0.0)
    result = ExpertSearchResult(layer=block.layer_idx, experts=(), gates=())
    result.shared_only_score = float(divergence_sum(h, base, metric) / tokens)
    if k == 0:
        return result

    cached = num_experts * tokens * hidden * 4 <= cache_bytes
    outputs = None
    if cached:
        outputs = torch.stack([block.expert_output(e, x).float() for e in range(num_experts)])  # (E, T, H)
        result.expert_passes += num_experts

    chosen: list[int] = []
    for _ in range(k):
        candidates = [e for e in range(num_experts) if e not in chosen]
        scale = (m * gates[candidates]).view(-1, 1, 1)
        scores = torch.zeros(len(candidates), dtype=torch.float64)
        step = _token_chunk(len(candidates), hidden)
        for start in range(0, tokens, step):
            sl = slice(start, start + step)
            if cached:
                cand_out = outputs[candidates, sl]
            else:
                cand_out = torch.stack([block.expert_output(e, x[sl]).float() for e in candidates])
            scores += divergence_sum(h[sl], base[sl].unsqueeze(0) + scale * cand_out, metric).double()
        if not cached:
            result.expert_passes += len(candidates)
        best = candidates[int(torch.argmin(scores))]
        chosen.append(best)
        best_out = outputs[best] if cached else block.expert_output(best, x).float()
        base = base + m * gates[best] * best_out
        result.step_scores.append(float(scores.min() / tokens))
    result.experts = tuple(chosen)
    result.gates = tuple(float(gates[e]) for e in chosen)
    return result


@torch.no_grad()
def layer_divergence(block: MoEBlock, acts: LayerActivations, experts: tuple[int, ...], gates: torch.Tensor,
                     metric: str = "js") -> float:
    """Mean per-token divergence of the decoder-layer output when ``block`` keeps ``experts`` (Eq. 3)."""
    m = acts.residual_scale
    shared = block.shared_output(acts.x)
    out = acts.h.float() - m * acts.y.float() + (m * shared.float() if shared is not None else 0.0)
    for e in experts:
        out = out + m * gates[e] * block.expert_output(e, acts.x).float()
    return float(divergence_sum(acts.h, out, metric) / acts.x.shape[0])
