"""Bytes of a compressed-tensors checkpoint (``--quantize w8a8 | w4a16 | fp8``) before it is written.

The layout facts that :mod:`cdmoe.methods.compressed` writes and :class:`~cdmoe.models.byte_budget.ByteTable`
prices (so that the budget planner plans in quantised bytes): which modules are quantised (every
``nn.Linear`` but :data:`KEEP_PATTERNS`, and routed experts, one linear per expert and projection),
the w4a16 group size, and per quantised (O, I) weight what is stored:

- ``w8a8``: int8 codes (O, I), 1 byte each, and fp32 ``weight_scale`` (O, 1);
- ``w4a16``: int32 ``weight_packed`` (O, I / 8) (4 bits a code), fp32 ``weight_scale`` (O, I / G) and
  the int64 ``weight_shape`` (2,);
- ``fp8``: float8_e4m3 codes (O, I) and fp32 ``weight_scale`` (ceil(O / 128), ceil(I / 128)).

A bias stays in its stored dtype. Activation scales are dynamic (computed per token at run time): none stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CdmoeError

__all__ = ["CODE_BYTES", "GROUP_SIZES", "KEEP_PATTERNS", "QUANT_SCHEMES", "QuantBytes", "input_widths", "is_quantised", "w4a16_group"]

QUANT_SCHEMES = ("w8a8", "w4a16", "fp8")
# kept as the source has them: the LM head, routers (HF and vLLM call them gate or router), per-token
# shared-expert gates (qwen2_moe's, and the condensed layer's shared_gate)
KEEP_PATTERNS = ["lm_head", r"re:.*\.(gate|router)$", r"re:.*shared_expert_gate$", r"re:.*\.shared_gate$"]
GROUP_SIZES = (128, 64, 32)
# bytes per weight of each --quantize scheme's codes (scales aside): what a writer holds beside the weights
CODE_BYTES = {"w8a8": 1.0, "fp8": 1.0, "w4a16": 0.5, "int8": 1.0, "int4": 0.5}
SCALE_BYTES = 4  # fp32 scales: q * s exact wherever it is dequantised
BLOCK = 128  # fp8's weight blocks (128 x 128) and activation groups


def w4a16_group(widths) -> int:
    """w4a16's group size G for quantised weights of these input widths: the largest of :data:`GROUP_SIZES`
    dividing every one (a one-line error when none does)."""
    fits = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths)]
    if not fits:
        raise CdmoeError(f"--quantize w4a16 needs input widths divisible by 32; this model has {sorted(widths)}")
    return fits[0]


def is_quantised(name: str, module: nn.Module) -> bool:
    """Whether module ``name`` (its full name in the model) is one the schemes quantise: an ``nn.Linear``
    not matched by :data:`KEEP_PATTERNS` (compressed-tensors' own matching)."""
    from compressed_tensors.utils.match import is_match

    return isinstance(module, nn.Linear) and is_match(name, module, ["Linear"], KEEP_PATTERNS)


def input_widths(model: nn.Module) -> list[int]:
    """Input widths of every weight the schemes quantise (fused experts too: H for gate/up, I for down)."""
    from .adapter import moe_blocks

    widths = {m.in_features for n, m in model.named_modules() if is_quantised(n, m)}
    for block in moe_blocks(model):
        if block.fused:
            widths |= {block.experts.gate_up_proj.shape[-1], block.experts.down_proj.shape[-1]}
    return sorted(widths)


@dataclass(frozen=True)
class QuantBytes:
    """Stored bytes of quantised weights under ``scheme`` (``group``: w4a16's G)."""

    scheme: str
    group: int | None = None

    @property
    def entries(self) -> tuple[str, ...]:
        """Suffixes of the tensors one quantised weight becomes (each a safetensors header entry)."""
        return ("weight_packed", "weight_scale", "weight_shape") if self.scheme == "w4a16" else ("weight",
                                                                                                  "weight_scale")

    def linear(self, out_features: int, in_features: int) -> int:
        """Bytes of one quantised (O, I) weight: its codes, scales (and, w4a16, its shape)."""
        o, i = out_features, in_features
        if self.scheme == "w8a8":
            return o * i + SCALE_BYTES * o
        if self.scheme == "w4a16":
            return o * (-(-i // 8)) * 4 + SCALE_BYTES * o * (i // self.group) + 2 * 8
        if self.scheme == "fp8":
            return o * i + SCALE_BYTES * (-(-o // BLOCK)) * (-(-i // BLOCK))
        raise CdmoeError(f"unknown compressed-tensors scheme {self.scheme!r}; use {', '.join(QUANT_SCHEMES)}")

    def fused_experts(self, name: str, tensor: torch.Tensor) -> int | None:
        """Bytes of a family's fused routed-expert tensor once unfused and quantised (one linear per expert and
        projection: ``gate_up_proj`` (E, 2I, H) is E gate and E up (I, H) weights, ``down_proj`` (E, H, I) E
        down ones), or None for a tensor that stays as stored (a bias)."""
        if tensor.dim() != 3:
            return None
        experts, rows, cols = tensor.shape
        if name.endswith("gate_up_proj"):
            return experts * 2 * self.linear(rows // 2, cols)
        if name.endswith("down_proj"):
            return experts * self.linear(rows, cols)
        return None
