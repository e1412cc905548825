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
once per step (or once per layer where cached); a candidate's condensed output is then
``base + g_i E_i(X)``, and candidates are scored together with one batched softmax.

Shaped for an accelerator (:class:`SearchMemory` says how much it may use):

- tokens go in chunks as large as ``work_bytes`` allows for one candidate's scoring
  temporaries (:func:`~cdmoe.memory.estimate.scoring_bytes`); candidates are scored in
  groups that fill the same budget, so an expert is called ceil(T / chunk) times per step
  (DeepSeek-V3 on 100 x 512 tokens: 2 chunks per step with 4 GiB, where a fixed 256 MiB for
  all candidates together gave 36-token chunks and ~164 M expert calls per run);
- the outputs of as many experts as ``cache_bytes`` holds are kept between steps in the
  compute dtype (E_i(X) is computed in that dtype and only widened to fp32 for scoring, so a
  cached output gives the same numbers as a recomputed one); the others are recomputed each
  step, chunk by chunk;
- everything stays on the compute device (gates, scores, the running condensed output); the
  host sees one (C,) score vector per step. Scores are summed over tokens in float64, so the
  choice does not depend on how tokens were chunked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..memory.estimate import SCORE_COPIES, SearchMemory, scoring_bytes
from ..models.adapter import MoEBlock
import torch.nn.functional as F

from .metrics import divergence_per_token, divergence_sum

__all__ = ["LayerActivations", "SearchMemory", "fixed_gates", "greedy_experts", "layer_divergence", "ExpertSearchResult",
           "token_chunk", "candidate_group", "cached_experts"]


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
    """Eq. 2: (gates (E,) fp32, counts (E,) long) from the routing of x (T, H), on x's device."""
    sums = torch.zeros(block.num_experts, dtype=torch.float64, device=x.device)
    counts = torch.zeros(block.num_experts, dtype=torch.long, device=x.device)
    for start in range(0, x.shape[0], chunk):
        routing = block.route(x[start : start + chunk])
        index = routing.indices.reshape(-1)
        sums.index_add_(0, index, routing.gates.reshape(-1).double())
        counts.index_add_(0, index, torch.ones_like(index))
    fallback = sums.sum() / counts.sum().clamp(min=1)
    gates = torch.where(counts > 0, sums / counts.clamp(min=1), fallback)
    return gates.float(), counts


def token_chunk(tokens: int, hidden: int, inter: int, work_bytes: int) -> int:
    """Tokens scored at once: the largest chunk whose scoring of one candidate
    (:func:`~cdmoe.memory.estimate.scoring_bytes`) fits ``work_bytes``."""
    return max(1, min(tokens, work_bytes // scoring_bytes(1, 1, hidden, inter)))


def candidate_group(candidates: int, chunk: int, hidden: int, work_bytes: int) -> int:
    """Candidates scored together on a ``chunk``-token chunk within ``work_bytes``."""
    fits = (work_bytes // (4 * hidden * chunk) - 2) // SCORE_COPIES
    return max(1, min(candidates, fits))


def cached_experts(num_experts: int, tokens: int, hidden: int, itemsize: int, cache_bytes: int) -> int:
    """How many experts' outputs (T, H) in the compute dtype fit ``cache_bytes``."""
    return max(0, min(num_experts, cache_bytes // max(1, tokens * hidden * itemsize)))


class _ExpertOutputs:
    """E_e(X) chunk by chunk: from the cache for the first ``n_cached`` experts, else computed."""

    def __init__(self, block: MoEBlock, x: torch.Tensor, chunk: int, cache_bytes: int):
        self.block, self.x = block, x
        dtype = block.expert_weights(0)[0].dtype  # what expert_output computes in
        n_cached = cached_experts(block.num_experts, x.shape[0], x.shape[1], dtype.itemsize, cache_bytes)
        self.cache = torch.empty(n_cached, x.shape[0], x.shape[1], dtype=dtype, device=x.device) if n_cached else None
        for e in range(n_cached):
            for start in range(0, x.shape[0], chunk):
                self.cache[e, start : start + chunk] = block.expert_output(e, x[start : start + chunk])

    @property
    def n_cached(self) -> int:
        return 0 if self.cache is None else self.cache.shape[0]

    def get(self, e: int, sl: slice) -> torch.Tensor:
        """E_e(X[sl]) in fp32, (chunk, H)."""
        if e < self.n_cached:
            return self.cache[e, sl].float()
        return self.block.expert_output(e, self.x[sl]).float()

    def uncached(self, experts: list[int]) -> int:
        return sum(1 for e in experts if e >= self.n_cached)


@torch.no_grad()
def greedy_experts(
    block: MoEBlock,
    acts: LayerActivations,
    gates: torch.Tensor,
    k: int,
    metric: str = "js",
    memory: SearchMemory = SearchMemory(),
) -> ExpertSearchResult:
    """Algorithm 1 on one layer: choose ``k`` routed experts to keep with the shared ones.

    Everything is computed on ``acts.x``'s device; ``gates`` (E,) may be anywhere.
    """
    x, m = acts.x, acts.residual_scale
    tokens, hidden = x.shape
    gates = gates.to(x.device)
    chunk = token_chunk(tokens, hidden, block.expert_weights(0)[0].shape[0], memory.work_bytes)
    shared = block.shared_output(x)
    h = acts.h.float()
    # condensed output so far: residual + m * (shared + sum of chosen g_i E_i(x)), fp32 (T, H)
    base = h - m * acts.y.float() + (m * shared.float() if shared is not None else 0.0)
    del shared
    result = ExpertSearchResult(layer=block.layer_idx, experts=(), gates=())
    shared_only = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, tokens, chunk):
        sl = slice(start, start + chunk)
        shared_only += divergence_per_token(F.log_softmax(h[sl], -1), base[sl], metric).sum(dtype=torch.float64)
    result.shared_only_score = float(shared_only / tokens)
    if k == 0:
        return result

    outputs = _ExpertOutputs(block, x, chunk, memory.cache_bytes)
    result.expert_passes += outputs.n_cached
    chosen: list[int] = []
    for _ in range(k):
        candidates = [e for e in range(block.num_experts) if e not in chosen]
        scale = (m * gates[torch.tensor(candidates, device=x.device)]).view(-1, 1, 1)
        group = candidate_group(len(candidates), chunk, hidden, memory.work_bytes)
        scores = torch.zeros(len(candidates), dtype=torch.float64, device=x.device)
        for start in range(0, tokens, chunk):
            sl = slice(start, start + chunk)
            log_p = F.log_softmax(h[sl], -1)
            p = log_p.exp()
            for g in range(0, len(candidates), group):
                members = candidates[g : g + group]
                out = torch.stack([outputs.get(e, sl) for e in members])  # (G, chunk, H) fp32
                cand = out.mul_(scale[g : g + group]).add_(base[sl])
                scores[g : g + group] += divergence_per_token(log_p, cand, metric, p).sum(-1, dtype=torch.float64)
                del out, cand
        result.expert_passes += outputs.uncached(candidates)
        host = scores.cpu()  # the step's one transfer to the host
        best = candidates[int(host.argmin())]
        chosen.append(best)
        weight = m * gates[best]
        for start in range(0, tokens, chunk):
            sl = slice(start, start + chunk)
            base[sl] += weight * outputs.get(best, sl)
        result.step_scores.append(float(host.min() / tokens))
    result.experts = tuple(chosen)
    result.gates = tuple(gates.cpu()[list(chosen)].tolist())
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
