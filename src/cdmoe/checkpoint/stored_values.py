"""The values of some tensors of a saved directory as a method reads and rewrites them: plain or block-FP8.

A method that changes weights of a finished output in place (healing) reads each tensor as the value
it stands for and writes it back in the form the directory stores it:

- a plain tensor (bf16, fp32, ...): its value; written cast to its stored dtype;
- an fp8 weight of an FP8 output (:mod:`cdmoe.checkpoint.fp8_output`: the condensed MLPs of an FP8
  output are block-quantised): its Eq. (1) value (:func:`~cdmoe.models.fp8_blocks.dequantize`, bf16),
  its ``_scale_inv`` not a value of its own; written block-quantised afresh (Q and S,
  :func:`~cdmoe.models.fp8_blocks.quantize`, the directory's block size), as the FP8 writer does.

:meth:`StoredValues.round` rounds a module's tensors to what will be written (fp8 weights through their
blocks, and back), so that what is measured after a change is what is saved.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..models.fp8_blocks import BlockFp8, block_fp8, dequantize, quantize
from ..models.input_checks import read_config

__all__ = ["FP8", "StoredValues"]

FP8 = "fp8"  # the stored form of a block-quantised weight (its value is bf16)


class StoredValues:
    """The stored tensors of ``directory`` ({name: shard file}, from its safetensors headers)."""

    def __init__(self, directory: str | Path, files: dict[str, str]):
        self.directory, self.files = Path(directory), files
        self.fp8: BlockFp8 | None = block_fp8(self.directory, read_config(self.directory))
        self.scale_names = set(self.fp8.scales.values()) if self.fp8 is not None else set()

    def _get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.directory / self.files[name], "pt") as f:
            return f.get_tensor(name)

    def read(self, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.dtype | str]]:
        """({name without ``prefix``: value}, {that name: stored dtype, or :data:`FP8`}) of every tensor
        under ``prefix`` (fp8 scales are part of their weight, not values)."""
        values, forms = {}, {}
        for name in sorted(k for k in self.files if k.startswith(prefix) and k not in self.scale_names):
            short = name.removeprefix(prefix)
            if self.fp8 is not None and name in self.fp8.scales:
                values[short] = dequantize(self._get(name), self._get(self.fp8.scales[name]), self.fp8.block)
                forms[short] = FP8
            else:
                values[short] = self._get(name)
                forms[short] = values[short].dtype
        return values, forms

    def round(self, forms: dict[str, torch.dtype | str]) -> Callable[[nn.Module], None]:
        """Round a module's tensors, in place, to the values they will be written as (and back to their dtype)."""
        block = self.fp8.block if self.fp8 is not None else None

        @torch.no_grad()
        def apply(module: nn.Module) -> None:
            for name, tensor in module.state_dict().items():
                if forms[name] == FP8:
                    value = dequantize(*quantize(tensor.to(torch.bfloat16), block), block)
                else:
                    value = tensor.to(forms[name])
                tensor.copy_(value.to(tensor.dtype))

        return apply

    def encode(self, name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """{stored name: stored tensor} of the new ``value`` of ``name``: the fp8 weight and its scales for
        an fp8 weight, else the value itself (cast to its stored dtype by the writer)."""
        if self.fp8 is not None and name in self.fp8.scales:
            q, scale = quantize(value.detach().cpu().to(torch.bfloat16), self.fp8.block)
            return {name: q, self.fp8.scales[name]: scale}
        return {name: value}
