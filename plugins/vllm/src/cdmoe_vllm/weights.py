"""Rename a condensed checkpoint's tensors to the names vLLM's family loaders read.

cdmoe saves transformers 5's in-memory layout. vLLM's loaders read the hub's original
per-expert layout, so on load:

* fused routed experts ``{p}.experts.gate_up_proj`` (E, 2I, H) become
  ``{p}.experts.{e}.{gate}.weight`` = ``[e, :I]`` and ``{p}.experts.{e}.{up}.weight`` =
  ``[e, I:]`` (each (I, H)); ``{p}.experts.down_proj`` (E, H, I) becomes
  ``{p}.experts.{e}.{down}.weight`` (H, I); (gate, up, down) are the family's names
  (Mixtral: w1, w3, w2);
* unfused experts (one tensor per expert and projection, as quantised outputs store them:
  ``{p}.experts.{e}.gate_proj.{weight, weight_scale, ...}``) keep their layout and take the
  family's projection names;
* the block attribute ``mlp`` of transformers becomes vLLM's (Mixtral: ``block_sparse_moe``).

Everything else (attention, norms, condensed ``mlp.gate_proj`` ...) keeps its name: the
family loaders already map those. Block Drop checkpoints are saved renumbered, as vLLM
builds them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

__all__ = ["to_checkpoint_name", "to_vllm_weights"]

_BLOCK = re.compile(r"^(model\.layers\.\d+)\.mlp\.")
_UNFUSED = re.compile(r"\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.")
# vLLM's fused-MoE parameters (``experts.w13_weight``; vLLM 0.32: ``experts.routed_experts.w13_weight``)
# -> the fused checkpoint tensors they are read from
_FUSED = {re.compile(r"\.experts\.(?:\w+\.)*w13_weight$"): ".experts.gate_up_proj",
          re.compile(r"\.experts\.(?:\w+\.)*w2_weight$"): ".experts.down_proj"}


def to_vllm_weights(
    weights: Iterable[tuple[str, torch.Tensor]], slot: str, expert_names: tuple[str, str, str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of the checkpoint -> pairs with vLLM's names (lazy)."""
    gate, up, down = expert_names
    projections = {"gate_proj": gate, "up_proj": up, "down_proj": down}
    for name, tensor in weights:
        if slot != "mlp":
            name = _BLOCK.sub(rf"\1.{slot}.", name)
        name = _UNFUSED.sub(lambda m: f".experts.{m[1]}.{projections[m[2]]}.", name)
        if name.endswith(".experts.gate_up_proj"):
            stem, half = name.removesuffix("gate_up_proj"), tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                yield f"{stem}{e}.{gate}.weight", tensor[e, :half]
                yield f"{stem}{e}.{up}.weight", tensor[e, half:]
        elif name.endswith(".experts.down_proj"):
            stem = name.removesuffix("down_proj")
            for e in range(tensor.shape[0]):
                yield f"{stem}{e}.{down}.weight", tensor[e]
        else:
            yield name, tensor


def to_checkpoint_name(name: str, slot: str) -> str:
    """A vLLM parameter name of the family model -> the checkpoint tensor it is loaded from (the
    inverse of :func:`to_vllm_weights` for one name; merged shards are named by the caller)."""
    if slot != "mlp":
        name = re.sub(rf"^(model\.layers\.\d+)\.{slot}\.", r"\1.mlp.", name)
    for vllm_suffix, suffix in _FUSED.items():
        name = vllm_suffix.sub(suffix, name)
    return name
