"""Where to compute and whether the model fits: ``--device`` and ``--mode`` resolution.

``--device auto`` is the first CUDA device when there is one, else the CPU. ``--mode auto``
is sequential (one decoder layer in memory at a time) when the weights, in the compute
dtype, exceed the device's available memory (psutil for the CPU, ``torch.cuda.mem_get_info``
for a GPU) times ``FIT_FRACTION``; the rest is left for activations, conversions and the
runtime. With several GPUs and ``--device auto``, whole mode spreads the layers over them
with accelerate's device map (``device_map="auto"``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CdmoeError
from ..models.placement import resolve_device  # noqa: F401  (re-exported: where --device is resolved)

__all__ = ["FIT_FRACTION", "available_bytes", "resolve_device", "weights_bytes", "choose_mode"]

FIT_FRACTION = 0.7
MODES = ("auto", "whole", "sequential")


def available_bytes(device: torch.device) -> int:
    """Free memory of ``device`` now (all GPUs together for ``cuda`` without an index and several GPUs)."""
    if device.type == "cuda":
        if device.index is None and torch.cuda.device_count() > 1:
            return sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def weights_bytes(model: str | Path, compute: torch.dtype, stored: torch.dtype | None) -> int:
    """Bytes the checkpoint's weights take in the compute dtype (from the safetensors file sizes)."""
    files = list(Path(str(model)).glob("*.safetensors")) + list(Path(str(model)).glob("*.bin"))
    on_disk = sum(f.stat().st_size for f in files)
    if stored is None:
        return on_disk
    return on_disk * compute.itemsize // stored.itemsize


def choose_mode(mode: str, model: str | Path, device: torch.device, compute: torch.dtype,
                stored: torch.dtype | None) -> tuple[str, str]:
    """(``whole`` | ``sequential``, why) for ``--mode mode``."""
    if mode not in MODES:
        raise CdmoeError(f"unknown --mode {mode!r}; use {', '.join(MODES)}")
    if mode != "auto":
        return mode, f"--mode {mode}"
    need = weights_bytes(model, compute, stored)
    have = available_bytes(device)
    fits = need <= FIT_FRACTION * have
    why = (f"weights {need / 2**30:.2f} GiB in {str(compute).removeprefix('torch.')} vs "
           f"{have / 2**30:.2f} GiB available on {device}")
    return ("whole" if fits else "sequential"), why
