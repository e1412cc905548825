"""Layer Drop and Block Drop (He et al., arXiv 2406.02500): remove what changes the residual stream least.

- Layer Drop removes the N sparse MoE sub-layers whose residual stream changes least (highest cosine
  similarity before/after the MoE add, on calibration tokens); a cdmoe-format checkpoint
  (``dropped_layers``).
- Block Drop removes the N whole decoder layers whose output is most similar to their input; the
  remaining layers are renumbered (``dropped_blocks``).

The similarities come from :mod:`cdmoe.methods.calib_stats`.
"""

from __future__ import annotations

from torch import nn

from ..errors import CdmoeError
from ..models.adapter import decoder_layers, family_spec
from ..models.condensed import to_cdmoe_format
from ..models.modeling_cdmoe import DroppedMLP, remove_blocks

__all__ = ["drop_blocks", "drop_layers", "most_similar_first", "top_layers"]


def most_similar_first(scores: dict[int, float]) -> list[int]:
    """Layers by decreasing cosine similarity (ties: lower index): the order Layer/Block Drop drop them in."""
    return sorted(scores, key=lambda i: (-scores[i], i))


def top_layers(scores: dict[int, float], n: int, what: str) -> list[int]:
    """The ``n`` layers (or blocks) to drop, ascending: the most similar first (``--layers`` checked)."""
    if not 1 <= n <= len(scores):
        raise CdmoeError(f"--layers {n} is out of range: the model has {len(scores)} {what}")
    return sorted(most_similar_first(scores)[:n])


def drop_layers(model: nn.Module, layers: list[int]) -> nn.Module:
    """Layer Drop: the MoE sub-layers of ``layers`` add nothing (in place; cdmoe format)."""
    spec = family_spec(model)
    stack = decoder_layers(model, spec)
    for i in layers:
        setattr(stack[i], spec.block_attr, DroppedMLP())
    previous = (getattr(model.config, "cdmoe", None) or {}).get("dropped_layers", [])
    return to_cdmoe_format(model, {"dropped_layers": sorted(set(previous) | set(layers))})


def drop_blocks(model: nn.Module, blocks: list[int]) -> nn.Module:
    """Block Drop: decoder layers ``blocks`` removed (in place; cdmoe format)."""
    spec = family_spec(model)
    remove_blocks(model, spec.layers_path, blocks)
    return to_cdmoe_format(model, {"dropped_blocks": sorted(blocks)})
