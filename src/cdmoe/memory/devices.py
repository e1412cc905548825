"""Where to compute and how much is free there: ``--device`` resolution and free memory and disk.

``--device auto`` is the first CUDA device when there is one, else the CPU. Free memory is
counted per device, on the one device the run computes on (``cuda`` without an index is the
current CUDA device): memory of other GPUs is never added, since one layer or one activation
set cannot use it. Whether a run fits is :mod:`cdmoe.memory.fit`'s question.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CdmoeError

__all__ = ["available_bytes", "disk_free_bytes", "host_available_bytes", "resolve_device"]


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` as a torch device, with a one-line error if unavailable."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise CdmoeError(f"unknown --device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CdmoeError(f"--device {device} but no CUDA device is available; use --device cpu")
    if resolved.type not in ("cpu", "cuda"):
        raise CdmoeError(f"unsupported --device {device!r}; use cpu, cuda, cuda:N or auto")
    return resolved


def available_bytes(device: torch.device) -> int:
    """Free memory of ``device`` now: ``torch.cuda.mem_get_info`` of that one GPU (``cuda`` without
    an index: the current one), or the host's available memory (psutil) for the CPU."""
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        return torch.cuda.mem_get_info(index)[0]
    return host_available_bytes()


def host_available_bytes() -> int:
    """Host memory available to a new allocation now (psutil: free plus reclaimable caches)."""
    import psutil

    return psutil.virtual_memory().available


def disk_free_bytes(path: str | Path) -> int:
    """Free bytes on the file system that ``path`` (or its nearest existing parent) is on."""
    import shutil

    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free
