"""Block-quantised FP8 checkpoints (DeepSeek-V3/R1, Qwen3-*-FP8): found on disk, read as their bf16 cast.

Such a checkpoint stores a quantised weight W (rows x cols, or experts x rows x cols) as float8_e4m3fn
values Q and a float32 ``<name>_scale_inv`` S with one entry per block of ``weight_block_size``
[bm, bn] (``config.json``: ``quantization_config: {quant_method: fp8, fmt: e4m3, weight_block_size:
[128, 128], activation_scheme: dynamic}``); blocks at the bottom and right edges are partial, so S is
ceil(rows / bm) x ceil(cols / bn). The value it stands for is

    W[i, j] = bf16( fp32(Q[i, j]) * S[i // bm, j // bn] )                                        (1)

which is exactly what DeepSeek-V3's ``inference/fp8_cast_bf16.py`` writes (``kernel.weight_dequant``:
an fp32 multiply per block, stored in its default dtype, bf16). cdmoe reads FP8 checkpoints through
(1) in whole and sequential mode, so every choice equals the run on that bf16 cast.

:func:`quantize` is the inverse DeepSeek (``kernel.weight_quant``) and vLLM (``per_block_cast_to_fp8``)
use: per block S = max(amax, 1e-4) / 448 (448: the largest e4m3 value; the floor is vLLM's, for
all-zero blocks) and Q = e4m3(clamp(W / S, -448, 448)). For a bf16 W, quantising the dequantised
quantisation gives the same bytes again (``tests/models/test_fp8_blocks.py``), so rounding a model to
what will be saved and then saving it agree.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CdmoeError

__all__ = ["FP8_MAX", "SCALE_SUFFIX", "BlockFp8", "DequantizedSlice", "SourceBlocks", "block_fp8", "declares_fp8",
           "dequantize", "dequantizing_state", "quantization_entry", "quantize"]

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
SCALE_SUFFIX = "_scale_inv"
_AMAX_FLOOR = 1e-4
_FIX = "dequantise it to bf16 first (DeepSeek's inference/fp8_cast_bf16.py) and drop quantization_config"


def quantization_entry(config: dict) -> dict | None:
    """``config.json``'s ``quantization_config`` (None if the checkpoint declares none)."""
    entry = config.get("quantization_config")
    return entry if isinstance(entry, dict) and entry else None


def declares_fp8(entry) -> bool:
    """Whether a ``quantization_config`` (a dict, transformers' config object or None) is fp8."""
    entry = entry.to_dict() if hasattr(entry, "to_dict") else entry
    return isinstance(entry, dict) and entry.get("quant_method") == "fp8"


@dataclass(frozen=True)
class BlockFp8:
    """A block-FP8 checkpoint: its ``quantization_config`` (written back into FP8 outputs), the block
    [bm, bn], {fp8 weight name: its scale name} and {tensor name: shard file}, all checkpoint names."""

    entry: dict
    block: tuple[int, int]
    scales: dict[str, str]
    files: dict[str, str]

    @property
    def scale_names(self) -> set[str]:
        return set(self.scales.values())


def block_fp8(directory: str | Path, config: dict) -> BlockFp8 | None:
    """The block-FP8 layout of a local checkpoint, from its config and safetensors headers; None if
    its config declares no fp8 quantisation, or declares it but stores no float8 tensor (a bf16 cast
    that kept the entry: the caller drops the entry). Anything else that is not (1) is a one-line error."""
    from .input_checks import safetensors_header, shard_files

    entry = quantization_entry(config)
    if not declares_fp8(entry):
        return None
    directory = Path(directory)
    headers = {}
    files = {}
    for name in shard_files(directory):
        for key, info in safetensors_header(directory / name).items():
            if key != "__metadata__":
                headers[key] = info
                files[key] = name
    fp8 = sorted(k for k, info in headers.items() if info["dtype"].startswith("F8"))
    if not fp8:
        return None
    where = f"{directory}: quantization_config {entry}"
    block = entry.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CdmoeError(f"{where} has no weight_block_size [rows, cols]; cdmoe reads block-quantised FP8 only "
                         f"(per-tensor FP8 is not supported): {_FIX}")
    if entry.get("fmt", "e4m3") != "e4m3" or entry.get("activation_scheme", "dynamic") != "dynamic":
        raise CdmoeError(f"{where}: cdmoe reads fmt e4m3 with activation_scheme dynamic only; {_FIX}")
    scales = {}
    for key in fp8:
        info, scale = headers[key], headers.get(key + SCALE_SUFFIX)
        shape = list(info["shape"])
        want = shape[:-2] + [math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1])] if len(shape) >= 2 else None
        problem = ("is not float8_e4m3fn" if info["dtype"] != "F8_E4M3" else "is not a matrix" if want is None
                   else f"has no {key + SCALE_SUFFIX}" if scale is None
                   else f"has a {scale['dtype']} scale (float32 expected)" if scale["dtype"] != "F32"
                   else f"has scales of shape {scale['shape']}, {want} expected for blocks {list(block)}"
                   if list(scale["shape"]) != want else None)
        if problem:
            raise CdmoeError(f"{directory}: the FP8 tensor {key} {problem}; cdmoe reads block-quantised e4m3 "
                             f"weights with one float32 scale per block: {_FIX}")
        scales[key] = key + SCALE_SUFFIX
    return BlockFp8(entry=dict(entry), block=(block[0], block[1]), scales=scales, files=files)


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Eq. (1): the bf16 weight that fp8 ``q`` (..., rows, cols) with per-block ``scale_inv`` stands for.
    One fp32 copy of ``q`` is the only temporary: the scales are repeated over rows only and broadcast
    over each block's columns (the last, partial column block on its own)."""
    rows, cols = q.shape[-2:]
    bn = block[1]
    full = cols // bn
    scale = scale_inv.float().repeat_interleave(block[0], -2)[..., :rows, :]  # (..., rows, ceil(cols / bn))
    w = q.float()
    w[..., : full * bn].unflatten(-1, (full, bn)).mul_(scale[..., :full, None])
    if cols % bn:
        w[..., full * bn:].mul_(scale[..., full:])
    return w.to(torch.bfloat16)


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q float8_e4m3fn, S float32) of ``w`` (..., rows, cols): S = max(block amax, 1e-4) / 448 per block,
    Q = e4m3(clamp(w / S, -448, 448)), as DeepSeek's ``weight_quant`` and vLLM's ``per_block_cast_to_fp8``."""
    rows, cols = w.shape[-2:]
    bm, bn = block
    n_r, n_c = math.ceil(rows / bm), math.ceil(cols / bn)
    padded = torch.nn.functional.pad(w.float(), (0, n_c * bn - cols, 0, n_r * bm - rows))
    blocks = padded.unflatten(-1, (n_c, bn)).unflatten(-3, (n_r, bm))  # (..., n_r, bm, n_c, bn)
    scale = blocks.abs().amax(dim=(-3, -1)).clamp(min=_AMAX_FLOOR) / FP8_MAX  # (..., n_r, n_c)
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-4, -3).flatten(-2, -1)[..., :rows, :cols].contiguous(), scale.contiguous()


class DequantizedSlice:
    """A lazy fp8 tensor of a checkpoint that materialises as Eq. (1), in bf16: stands in for a
    safetensors slice in the state dicts transformers' loaders read (``slice[...]``)."""

    def __init__(self, weight, scale_inv, block: tuple[int, int]):
        self.weight, self.scale_inv, self.block = weight, scale_inv, block

    def __getitem__(self, index) -> torch.Tensor:
        full = dequantize(self.weight[...], self.scale_inv[...], self.block)
        return full if index is Ellipsis else full[index]

    def get_shape(self) -> list[int]:
        return list(self.weight.get_shape())

    def get_dtype(self) -> str:
        return "BF16"


def dequantizing_state(keys, get_slice, fp8: BlockFp8 | None) -> dict:
    """{checkpoint name: slice} of ``keys`` for transformers' loaders (``get_slice(name)``: a safetensors
    slice), with every fp8 weight read through Eq. (1) and the scales themselves left out."""
    if fp8 is None:
        return {k: get_slice(k) for k in keys}
    skip = fp8.scale_names
    return {k: DequantizedSlice(get_slice(k), get_slice(fp8.scales[k]), fp8.block) if k in fp8.scales else get_slice(k)
            for k in keys if k not in skip}


class SourceBlocks(contextlib.ExitStack):
    """The fp8 weights of a block-FP8 checkpoint by name, each shard opened once (a context manager)::

        with SourceBlocks(directory, fp8) as source:
            kept = source.unchanged(name, value)   # (Q, S) if ``value`` is still Eq. (1) of them, else None
    """

    def __init__(self, directory: str | Path, fp8: BlockFp8):
        super().__init__()
        self.directory, self.fp8, self._handles = Path(directory), fp8, {}

    def _get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        name = self.fp8.files[key]
        if name not in self._handles:
            self._handles[name] = self.enter_context(safe_open(self.directory / name, "pt"))
        return self._handles[name].get_tensor(key)

    def unchanged(self, key: str, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The source's (Q, S) of fp8 weight ``key`` if ``value`` equals its Eq. (1) (a method left it as
        read), else None (changed, or ``key`` is not an fp8 weight of the source)."""
        if key not in self.fp8.scales:
            return None
        q, scale = self._get(key), self._get(self.fp8.scales[key])
        same = q.shape == value.shape and torch.equal(
            dequantize(q.to(value.device), scale.to(value.device), self.fp8.block), value.to(torch.bfloat16))
        return (q, scale) if same else None
