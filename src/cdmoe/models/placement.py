"""Where a command computes: ``--device`` and ``--dtype`` resolved once, before anything is loaded.

``--device`` (every command that loads a model):

- ``auto`` (default): the GPU when CUDA is present, else the CPU. With several GPUs, a whole model is
  spread over all of them by accelerate's device map (``device_map="auto"``, each GPU filled up to
  its own free memory); what needs one device (sequential mode, fine-tuning) uses GPU 0.
- ``cuda`` is GPU 0 (``torch.cuda.current_device()``), ``cuda:N`` GPU N: that GPU alone, nothing is
  spread. ``cpu``: the CPU.
- A GPU asked for on a machine without CUDA, an index beyond the GPUs present, or another device type
  is a one-line error, raised before any file is read or written.

Compute dtype (``--dtype``): ``auto`` computes in the checkpoint's dtype on a GPU (bf16 for most
releases) and in fp32 on the CPU, where half-precision matmuls are slow and divergences of
near-identical distributions need the precision. ``fp32`` is true fp32 everywhere (TF32 off, so a
GPU run chooses what the CPU run chooses); ``tf32`` stores fp32 but lets a GPU's matmuls use TF32
(about 10 bits of mantissa, several times faster on Ampere and later); on a CPU it is fp32.
Weights are always saved in the dtypes the source stores (:mod:`cdmoe.models.storage_dtypes`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import CdmoeError

__all__ = ["DEVICE_HELP", "Placement", "describe", "matmul_precision", "place", "resolve_device", "trainer_device"]

DEVICE_HELP = "auto (GPU if present, else CPU; several GPUs: the model spread over all) | cpu | cuda | cuda:N"


def resolve_device(device: str | torch.device) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` as a torch device (``cuda`` gets its index), or a one-line error."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise CdmoeError(f"device must be a string such as 'cuda' or 'cpu', got {type(device).__name__}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise CdmoeError(f"unknown --device {device!r}; use {DEVICE_HELP}") from None
    if resolved.type not in ("cpu", "cuda"):
        raise CdmoeError(f"unsupported --device {device!r}; use {DEVICE_HELP}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise CdmoeError(f"--device {device} but no CUDA device is available (torch {torch.__version__}, "
                             f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu, or auto")
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if resolved.index is None else resolved.index
        if index >= count:
            raise CdmoeError(f"--device {device}: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}")
        resolved = torch.device("cuda", index)
    return resolved


@dataclass(frozen=True)
class Placement:
    """Where a whole model goes: ``device`` (inputs and single-device work) and, for ``from_pretrained``,
    ``device_map`` (None: load on the CPU, the default; a dict: straight onto one GPU; ``"auto"``: spread)."""

    device: torch.device
    device_map: dict | str | None
    spread: bool = False  # over several GPUs

    def __str__(self) -> str:
        return describe(self)


def place(device: str | torch.device = "auto", whole: bool = True) -> Placement:
    """The placement of ``--device device``: several GPUs only for ``auto`` and a ``whole`` model."""
    requested = str(device)
    dev = resolve_device(device)
    if dev.type == "cpu":
        return Placement(dev, None)
    if whole and requested == "auto" and torch.cuda.device_count() > 1:
        return Placement(dev, "auto", spread=True)
    return Placement(dev, {"": str(dev)})


def trainer_device(device: str | torch.device) -> torch.device:
    """The device of a transformers ``Trainer`` run: the CPU or the first visible GPU (Trainer trains on
    ``cuda:0``; another GPU is chosen with ``CUDA_VISIBLE_DEVICES``), a one-line error otherwise."""
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index != 0:
        raise CdmoeError(f"--device {device}: fine-tuning runs on the first visible GPU (transformers Trainer); "
                         f"run with CUDA_VISIBLE_DEVICES={dev.index} and --device cuda")
    return dev


def describe(placement: Placement) -> str:
    """One line saying exactly which device(s) are used, e.g. ``cuda:0 (NVIDIA H100 80GB HBM3, 79.2 GiB free)``."""
    dev = placement.device
    if dev.type == "cpu":
        return "cpu"

    def gpu(i: int) -> str:
        free, _ = torch.cuda.mem_get_info(i)
        return f"cuda:{i} ({torch.cuda.get_device_name(i)}, {free / 2**30:.1f} GiB free)"

    if placement.spread:
        return "the model spread by accelerate over " + ", ".join(gpu(i) for i in range(torch.cuda.device_count()))
    return gpu(dev.index)


@contextlib.contextmanager
def matmul_precision(dtype: str | None) -> Iterator[None]:
    """TF32 matmuls for ``--dtype tf32``, true fp32 otherwise, for the duration of a command (restored after)."""
    allow = dtype == "tf32"
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
