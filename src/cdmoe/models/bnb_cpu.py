"""bitsandbytes' 4-bit CPU path: which quantised modules it can repack, and a guard for the others.

The guard lives in the shipped :mod:`cdmoe.models.modeling_cdmoe` (every load of a
condensed 4-bit checkpoint applies it, with or without cdmoe installed); this module is
where the rest of cdmoe imports it from, for models it quantises or loads itself
(:mod:`cdmoe.methods.quantize`, :func:`cdmoe.models.loading.load_model`).
"""

from __future__ import annotations

from .modeling_cdmoe import CPU_PACK_BLOCK_N, cpu_packing_supported, guard_cpu_packing

__all__ = ["CPU_PACK_BLOCK_N", "cpu_packing_supported", "guard_cpu_packing"]
