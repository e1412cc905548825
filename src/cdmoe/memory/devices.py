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
from ..models.placement import resolve_device  # noqa: F401  (re-exported: where --device is resolved)

__all__ = ["available_bytes", "disk_free_bytes", "host_available_bytes", "resolve_device"]


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
