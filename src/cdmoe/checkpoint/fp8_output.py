"""Writing an FP8 output of a block-FP8 source: FP8-sized, and untouched weights with the source's bytes.

A model read from a block-FP8 checkpoint holds bf16 values (Eq. 1 of :mod:`cdmoe.models.fp8_blocks`).
When its storage plan keeps the source's FP8 (``plan.fp8``, ``--dtype auto``), the output is written in
the source's own tensor layout (one tensor per expert, as the FP8 releases store them and as transformers'
and vLLM's FP8 loaders read them), and each weight is encoded as follows:

- a weight the source stores in fp8 whose value is still exactly the source's dequantisation: the
  source's fp8 bytes and ``_scale_inv``, copied (bit-identical);
- any other value under such a name (a method changed it), and a new Linear weight
  (:meth:`~cdmoe.models.storage_dtypes.StoragePlan.fp8_new`, e.g. Eq. 3's fused MLP): block-quantised
  afresh (:func:`~cdmoe.models.fp8_blocks.quantize`, the source's block size);
- everything else as the plan casts it (norms, routers, embeddings: the source's dtype).

``config.json`` gets the source's ``quantization_config`` back and, in the cdmoe format,
``cdmoe.checkpoint_keys: family``, so that the condensed class loads the family's keys
(:func:`cdmoe.models.modeling_cdmoe.condensed_classes`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..models.fp8_blocks import SCALE_SUFFIX, SourceBlocks, quantize
from ..models.storage_dtypes import StoragePlan, fp8_new_names
from .record import family_name

__all__ = ["encode_fp8", "family_layout", "fp8_config", "new_names_in_source_layout", "save_weights"]


def family_layout(model, state: dict) -> dict:
    """``state`` (``model``'s state-dict names) in its family's on-disk layout: the family's key conversions
    (transformers' conversion mapping of its ``model_type``) reversed, also for a condensed model, whose
    class transformers knows no conversions of."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import revert_weight_conversion

    had, kept = "_weight_conversions" in model.__dict__, model.__dict__.get("_weight_conversions")
    model._weight_conversions = get_checkpoint_conversion_mapping(family_name(model)) or []
    try:
        return revert_weight_conversion(model, state)
    finally:
        if had:
            model._weight_conversions = kept
        else:
            del model._weight_conversions


def new_names_in_source_layout(model, plan: StoragePlan) -> set[str]:
    """:func:`~cdmoe.models.storage_dtypes.fp8_new_names` of ``model``, named as they are written."""
    names = fp8_new_names(model, plan)
    return set(family_layout(model, {n: torch.empty(0, device="meta") for n in names})) if names else set()


@torch.no_grad()
def encode_fp8(tensors: dict[str, torch.Tensor], plan: StoragePlan, new: set[str]) -> dict[str, torch.Tensor]:
    """``tensors`` (source layout, already cast by ``plan``) with every fp8 weight as (fp8, ``_scale_inv``):
    the source's bytes where the value is unchanged, else quantised; ``new``: names to quantise as well."""
    out: dict[str, torch.Tensor] = {}
    with SourceBlocks(plan.source, plan.fp8) as source:
        for key, value in tensors.items():
            if key not in plan.fp8.scales and key not in new:
                out[key] = value
                continue
            q, scale = source.unchanged(key, value) or quantize(value.to(torch.bfloat16), plan.fp8.block)
            out[key], out[key + SCALE_SUFFIX] = q, scale
    return out


@contextlib.contextmanager
def fp8_config(model, plan: StoragePlan):
    """While saving an FP8 output: ``model.config`` carries the source's ``quantization_config`` and, in the
    cdmoe format, ``cdmoe.checkpoint_keys: family`` (the loader then applies the family's key conversions)."""
    if plan is None or plan.fp8 is None:
        yield
        return
    cdmoe = getattr(model.config, "cdmoe", None)
    model.config.quantization_config = dict(plan.fp8.entry)
    if cdmoe is not None:
        model.config.cdmoe = {**cdmoe, "checkpoint_keys": "family"}
    try:
        yield
    finally:
        del model.config.quantization_config
        if cdmoe is not None:
            model.config.cdmoe = cdmoe


def save_weights(model, directory: str | Path, plan: StoragePlan | None, max_shard_size: str = "5GB") -> None:
    """``model.save_pretrained(directory)``; for a plan that keeps the source's FP8, in the source's layout
    with the weights encoded by :func:`encode_fp8` (the model must already be cast by ``plan``)."""
    if plan is None or plan.fp8 is None:
        model.save_pretrained(directory, max_shard_size=max_shard_size)
        return
    state = encode_fp8(family_layout(model, model.state_dict()), plan, new_names_in_source_layout(model, plan))
    with fp8_config(model, plan):
        model.save_pretrained(directory, state_dict=state, save_original_format=False, max_shard_size=max_shard_size)
