"""Statistics of the original model on calibration tokens that the baselines rank by.

One forward pass per calibration batch, with hooks, accumulates:

- per decoder layer, the mean cosine similarity between its input and output hidden
  states (Block Drop, He et al. 2406.02500, drops the most similar blocks);
- per sparse MoE layer, the mean cosine similarity between the residual stream before
  and after the MoE sub-layer, ``h - s*y`` vs ``h`` (Layer Drop);
- per sparse MoE layer, each routed expert's summed routing score (softmax or sigmoid
  probability over all tokens; Expert Drop keeps the highest), its top-k selection count
  (M-SMoE's usage frequency) and the Gram matrix of router logits over tokens (M-SMoE
  groups experts whose router logits are most similar);
- with ``reap=True``, per sparse MoE layer, REAP's saliency accumulators (sum over the tokens
  routed to each expert of gate x output norm, and their count; :mod:`cdmoe.methods.reap`).

Nothing is cached per token: memory is one batch of activations plus (E, E) per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..models.adapter import config_value, decoder_layers, family_spec, moe_blocks
from .reap import ExpertSaliency, expert_saliency

__all__ = ["CalibStats", "calibration_stats"]


@dataclass
class CalibStats:
    tokens: int = 0
    block_cosine: dict[int, float] = field(default_factory=dict)  # decoder layer -> mean cos(input, output)
    moe_cosine: dict[int, float] = field(default_factory=dict)  # MoE layer -> mean cos(before, after MoE add)
    score_sums: dict[int, torch.Tensor] = field(default_factory=dict)  # (E,) summed routing probabilities
    counts: dict[int, torch.Tensor] = field(default_factory=dict)  # (E,) top-k selections
    logit_gram: dict[int, torch.Tensor] = field(default_factory=dict)  # (E, E) sum_t l_t l_t^T (router logits)
    reap: dict[int, ExpertSaliency] = field(default_factory=dict)  # MoE layer -> REAP accumulators (reap=True)

    def logit_similarity(self, layer: int) -> torch.Tensor:
        """(E, E) cosine similarity between experts' router-logit vectors over the tokens."""
        gram = self.logit_gram[layer]
        norms = gram.diagonal().clamp_min(1e-30).sqrt()
        return gram / norms[:, None] / norms[None, :]


def _cos_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.reshape(-1, a.shape[-1]).float(), b.reshape(-1, b.shape[-1]).float(), dim=-1).sum())


@torch.no_grad()
def calibration_stats(model: nn.Module, calib_ids: torch.Tensor, batch_size: int = 8,
                      reap: bool = False) -> CalibStats:
    """Run ``model`` over ``calib_ids`` (N, S) and accumulate :class:`CalibStats` (REAP's too if ``reap``)."""
    spec = family_spec(model)
    layers = decoder_layers(model, spec)
    blocks = {b.layer_idx: b for b in moe_blocks(model, spec)}
    scale = float(config_value(model.config, spec.residual_scale_key, 1.0)) if spec.residual_scale_key else 1.0
    stats = CalibStats()
    sums = {i: 0.0 for i in range(len(layers))}
    moe_sums = {i: 0.0 for i in blocks}
    for i, block in blocks.items():
        stats.score_sums[i] = torch.zeros(block.num_experts, dtype=torch.float64)
        stats.counts[i] = torch.zeros(block.num_experts, dtype=torch.long)
        stats.logit_gram[i] = torch.zeros(block.num_experts, block.num_experts, dtype=torch.float64)
        if reap:
            stats.reap[i] = ExpertSaliency.zeros(block.num_experts)
    seen: dict[tuple[str, int], torch.Tensor] = {}  # ("in" | "moe", layer) -> this batch's tensor

    def layer_pre(idx):
        def hook(module, args, kwargs):
            seen[("in", idx)] = args[0] if args else kwargs["hidden_states"]
        return hook

    def layer_post(idx):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            sums[idx] += _cos_sum(seen.pop(("in", idx)), out)
            if idx in blocks:
                y = seen.pop(("moe", idx))
                moe_sums[idx] += _cos_sum(out - scale * y, out)
        return hook

    def block_post(idx):
        def hook(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1])
            seen[("moe", idx)] = (output[0] if isinstance(output, tuple) else output).reshape(*args[0].shape)
            block = blocks[idx]
            routing = block.route(x)
            # reduced on the block's device, one small (E,) / (E, E) transfer per batch
            stats.score_sums[idx] += routing.scores.double().sum(0).cpu()
            stats.counts[idx] += torch.bincount(routing.indices.reshape(-1), minlength=block.num_experts).cpu()
            logits = F.linear(x.float(), block.router_weight.float()).double()
            stats.logit_gram[idx] += (logits.T @ logits).cpu()
            if reap:
                stats.reap[idx].add_(expert_saliency(block, x))
        return hook

    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(layer_pre(i), with_kwargs=True))
        hooks.append(layer.register_forward_hook(layer_post(i)))
    for i, block in blocks.items():
        hooks.append(block.module.register_forward_hook(block_post(i)))
    device = next(model.parameters()).device  # the embeddings' (the first GPU when spread)
    try:
        for ids in calib_ids.split(batch_size):
            model(input_ids=ids.to(device), use_cache=False)
            stats.tokens += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    stats.block_cosine = {i: s / stats.tokens for i, s in sums.items()}
    stats.moe_cosine = {i: s / stats.tokens for i, s in moe_sums.items()}
    return stats
