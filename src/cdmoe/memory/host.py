"""Host memory: give freed tensors back to the system.

glibc keeps freed blocks under its dynamic mmap threshold (which grows up to 32 MiB after the
first large free) in its heap, where fragmentation stops them from being reused or returned. A
Qwen1.5-MoE-A2.7B expert matrix is 5.8 MB in bf16 and 11.5 MB in fp32, so after sequential mode
loaded and released a decoder layer, most of that layer's memory stayed resident; condensing a
random model with its widths peaked far above one layer (``benchmarks/plan_vs_peak.py`` compares
the peak with the estimate that assumes freed memory is returned). :func:`return_freed_memory` fixes the
threshold at 1 MiB (``mallopt(M_MMAP_THRESHOLD)``): every block of 1 MiB or more is its own mapping
and goes back to the system when freed; smaller blocks stay in the heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["MMAP_THRESHOLD", "return_freed_memory"]

MMAP_THRESHOLD = 2**20
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_done = {"set": False}


def return_freed_memory() -> bool:
    """Make blocks of ``MMAP_THRESHOLD`` bytes or more separate mappings (glibc only; once per
    process). Returns whether it applies (False on other C libraries, where it does nothing)."""
    if _done["set"]:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError, TypeError):  # no libc found, or not glibc
        return False
    _done["set"] = ok
    return ok
