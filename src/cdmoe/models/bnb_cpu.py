"""bitsandbytes' 4-bit CPU path: which quantised modules it can repack, and a guard for the others.

Used wherever a 4-bit model is made or loaded (:mod:`cdmoe.methods.quantize`, :func:`cdmoe.models.loading.load_model`).
"""

from __future__ import annotations

from torch import nn

__all__ = ["CPU_PACK_BLOCK_N", "cpu_packing_supported", "guard_cpu_packing"]

CPU_PACK_BLOCK_N = 32  # bitsandbytes' CPU repacking works on blocks of 32 output rows


def cpu_packing_supported(module: nn.Module) -> bool:
    """Whether bitsandbytes' AVX512-BF16 CPU repacking of a 4-bit ``Linear4bit`` can handle its shape.

    On CPUs with AVX512-BF16, bitsandbytes (0.49, 0.50) repacks a 4-bit weight on its first
    CPU forward (``functional._convert_weight_packed_for_cpu``), reshaping the absmax to
    ``(out_features, in_features // blocksize)``: it fails (``shape '[64, 0]' is invalid``)
    unless ``in_features`` is a multiple of the block size (64) and ``out_features`` of 32.
    The demo model's hidden size (224) and most condensed widths are not.
    """
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    if state is None:
        return True
    out_f, in_f = module.out_features, module.in_features
    return in_f % state.blocksize == 0 and out_f % CPU_PACK_BLOCK_N == 0


def guard_cpu_packing(model: nn.Module) -> int:
    """Turn bitsandbytes' CPU repacking off for the 4-bit modules whose shape it cannot handle
    (:func:`cpu_packing_supported`); they then run bitsandbytes' generic 4-bit path, same values.
    Returns how many modules were switched. A no-op on CPUs without AVX512-BF16."""
    switched = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False) and not cpu_packing_supported(module):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched
