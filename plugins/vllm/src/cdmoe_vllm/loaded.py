"""After loading: every parameter of the model holds values from the checkpoint.

vLLM allocates parameters uninitialised and its own after-load check skips every linear layer of
an unquantised model (vLLM 0.32 ``DefaultModelLoader.track_weights_loading`` counts a module
with a ``process_weights_after_loading`` method as loaded), so a tensor missing from the
checkpoint is served as whatever the memory held, with no error. :func:`poison` fills every
floating-point parameter with NaN before the family's loader runs; :func:`check_loaded` then
finds any parameter, or any part of a merged one (one shard of ``gate_up_proj``/``qkv_proj``,
one expert of a fused MoE weight), that no checkpoint tensor wrote, and raises one line naming
the checkpoint tensor. This works alike for every family: it looks at values, not at names.
(A checkpoint that itself holds NaN is refused too; it could not be served anyway.)

Cost: one fill and one scan of the weights, in chunks of ``CHUNK`` elements (no full-size
temporary), once per load. Online quantisation (``quantization=...``) is not checked; in a quantised
checkpoint the floating-point tensors (scales) are, its integer weights are not (each comes with a scale).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import malformed
from .weights import to_checkpoint_name

__all__ = ["CHUNK", "check_loaded", "poison"]

CHUNK = 1 << 26  # elements per NaN scan step: a 64 MiB boolean temporary at most
# a quantised model's attention layers get KV-cache scales, defaults unless the checkpoint quantises the
# KV cache (cdmoe's do not): not checkpoint tensors
KV_CACHE_SCALES = {f"{kind}_{what}" for kind in ("q", "k", "v", "prob") for what in ("scale", "zero_point")}
# vLLM's merged layers and their checkpoint shards, where a family's packed_modules_mapping omits
# them (Mixtral's and OLMoE's have no dense MLP of their own, the condensed layers do)
_MERGED = {"gate_up_proj": ["gate_proj", "up_proj"], "qkv_proj": ["q_proj", "k_proj", "v_proj"]}


def poison(model: nn.Module) -> None:
    """Fill every floating-point parameter of ``model`` with NaN (in place)."""
    with torch.no_grad():
        for _, param in _checked(model):
            param.fill_(float("nan"))


def _checked(model: nn.Module):
    for name, param in model.named_parameters():  # (a tied lm_head is the embedding: listed once)
        if param.is_floating_point() and param.device.type != "meta" and name.rpartition(".")[2] not in KV_CACHE_SCALES:
            yield name, param


def _unwritten(tensor: torch.Tensor) -> bool:
    """Whether any element of ``tensor`` is still NaN (one device sync)."""
    flat = tensor.detach().reshape(-1)
    return bool(torch.stack([torch.isnan(part).any() for part in flat.split(CHUNK)]).any())


def _parts(model: nn.Module, name: str, param: torch.Tensor, packed: dict) -> list[tuple[str, str]]:
    """vLLM parameter ``name`` -> (name, note) of what it is made of that was not written: the
    shards of a merged linear layer (``packed``: shard names by merged module name), the experts
    of a fused MoE weight, else the parameter itself."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    owner, _, attr = module_name.rpartition(".")
    sizes = getattr(module, "output_partition_sizes", None)
    if attr in packed and sizes and len(sizes) == len(packed[attr]) and param.shape[0] == sum(sizes):
        return [(f"{owner}.{part}.{leaf}", "") for part, rows in zip(packed[attr], param.split(sizes))
                if _unwritten(rows)]
    if leaf.startswith(("w13_", "w2_")) and param.dim() >= 2:  # FusedMoE: (local experts, ...)
        experts = [e for e in range(param.shape[0]) if _unwritten(param[e])]
        return [(name, "" if len(experts) == param.shape[0] else f" (experts {experts} of {param.shape[0]} here)")]
    return [(name, "")]


def check_loaded(model: nn.Module, slot: str, where: str | None) -> None:
    """Raise :class:`~cdmoe_vllm.errors.CdmoeVllmError` if a parameter of ``model`` was not (fully)
    loaded; ``slot`` is the family's attribute for the MoE block (for the checkpoint's names)."""
    packed = {**_MERGED, **(getattr(model, "packed_modules_mapping", None) or {})}
    missing = [to_checkpoint_name(part, slot) + note for name, param in _checked(model) if _unwritten(param)
               for part, note in _parts(model, name, param, packed)]
    if missing:
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:4])}{', ...' if len(missing) > 4 else ''})"
        raise malformed(f"tensor {missing[0]} is missing from the checkpoint{more if len(missing) > 1 else ''}, "
                        "so vLLM would serve that weight uninitialised", where)
