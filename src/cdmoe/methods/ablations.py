"""Reference points for a condensed model, on the same layers: random experts, dropped layers.

``random_choices`` keeps K random routed experts per layer (seeded) with their Eq. 2
gates (the paper's *Random* expert selector, Table 2); ``DroppedBlock`` replaces an MoE
block by zeros, i.e. Layer Drop (He et al., 2406.02500) of that MoE sub-layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..models.adapter import decoder_layers, family_spec, moe_blocks
from ..models.condensed import LayerChoice, fuse_condensed_mlp

__all__ = ["DroppedBlock", "fused_modules", "random_choices", "swapped_blocks"]


class DroppedBlock(nn.Module):
    """An MoE sub-layer removed: contributes nothing to the residual stream."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def random_choices(expert_search: dict, layers: list[int], k: int, seed: int = 0) -> list[LayerChoice]:
    """K random routed experts per layer with their Eq. 2 gates (from a search record)."""
    gen = torch.Generator().manual_seed(seed)
    choices = []
    for layer in layers:
        gates = expert_search[str(layer)]["all_gates"]
        experts = tuple(torch.randperm(len(gates), generator=gen)[:k].tolist())
        choices.append(LayerChoice(layer=layer, experts=experts, gates=tuple(gates[e] for e in experts)))
    return choices


@contextlib.contextmanager
def swapped_blocks(model: nn.Module, modules: dict[int, nn.Module]) -> Iterator[None]:
    """Temporarily replace the MoE blocks of ``modules``' layers."""
    spec = family_spec(model)
    layers = decoder_layers(model, spec)
    saved = {i: getattr(layers[i], spec.block_attr) for i in modules}
    try:
        for i, module in modules.items():
            setattr(layers[i], spec.block_attr, module)
        yield
    finally:
        for i, module in saved.items():
            setattr(layers[i], spec.block_attr, module)


def fused_modules(model: nn.Module, choices: list[LayerChoice]) -> dict[int, nn.Module]:
    blocks = {b.layer_idx: b for b in moe_blocks(model)}
    return {c.layer: fuse_condensed_mlp(blocks[c.layer], c.experts, c.gates) for c in choices}
