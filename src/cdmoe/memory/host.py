"""Host memory: give freed tensors back to the system, and load layers without read-ahead.

Two things made sequential mode hold far more than one decoder layer (measured on a random
model with Qwen1.5-MoE-A2.7B's widths, ``benchmarks/plan_vs_peak.py``):

- glibc keeps freed blocks under its dynamic mmap threshold (which grows up to 32 MiB after
  the first large free) in its heap, where fragmentation stops them from being reused or
  returned: a Qwen1.5-MoE expert matrix is 5.8 MB in bf16 and 11.5 MB in fp32, so after a
  layer is loaded and released ~2 GiB of freed memory stayed resident. :func:`return_freed_memory`
  fixes the threshold at 1 MiB (``mallopt(M_MMAP_THRESHOLD)``): every block of 1 MiB or more is
  its own mapping and goes back to the system when freed. Smaller blocks stay in the heap.
- transformers' loader reads every tensor of a ``convert_and_load_state_dict_in_model`` call on a
  thread pool that runs ahead of the conversion, so all per-expert tensors of a layer (cast to
  the compute dtype) were alive before the first fused tensor was built: ~3x the layer.
  :func:`sync_loading` turns that off (transformers' own ``HF_DEACTIVATE_ASYNC_LOAD``, which it
  also uses when memory is tight), so one fused tensor's sources are read at a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Iterator

__all__ = ["MMAP_THRESHOLD", "return_freed_memory", "sync_loading"]

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


@contextlib.contextmanager
def sync_loading() -> Iterator[None]:
    """transformers' weight loading without its read-ahead thread pool, inside the block."""
    key = "HF_DEACTIVATE_ASYNC_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
