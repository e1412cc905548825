"""Quantised outputs written one decoder layer at a time: ``--quantize w8a8 | w4a16 | fp8`` in sequential mode.

The same checkpoint as whole mode's :func:`cdmoe.methods.compressed.quantize_compressed` (the tests compare
every tensor), with one decoder layer in memory. The output's meta-device skeleton is unfused (routed experts
one ``nn.Linear`` per expert and projection, on the meta device) and given the scheme's
``quantization_config`` (and, outside the family's own format, cdmoe's ``unfused_experts``); then, for each
decoder layer as the sequential store builds it (condensed, pruned or kept), a copy is rounded to its stored
dtypes, unfused, given round-to-nearest scales and compressed, and its tensors are returned to
:func:`cdmoe.checkpoint.stream_save.write_streamed`: fp32 scales, the codes as compressed-tensors packs them,
every other tensor in its stored dtype. Tensors outside the decoder layers (embeddings, final norm, LM head)
are never quantised. Memory beyond a plain sequential write: one copy of a decoder layer in the compute
dtype and its codes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..models.adapter import family_spec, moe_blocks
from ..models.modeling_cdmoe import UnfusedExperts
from ..models.storage_dtypes import StoragePlan
from .compressed import (check_scheme, compress_modules, config_entry, freeze_scales, quantized_modules,
                         record_entry, scheme_for, unfuse_for)

__all__ = ["StreamedQuantizer", "quantize_written"]

_FLOAT8 = {torch.float8_e4m3fn, torch.float8_e5m2}


@dataclass
class StreamedQuantizer:
    """``layer_tensors`` for :func:`~cdmoe.checkpoint.stream_save.write_streamed`: decoder layer ``idx``'s tensors
    quantised by ``name`` (build it with :meth:`prepare`, which makes the skeleton the quantised output's)."""

    name: str
    scheme: object  # compressed-tensors' QuantizationScheme
    native: bool
    storage: StoragePlan
    layers_path: str
    block_attr: str
    experts_attr: str
    hidden_act: str
    moe_layers: int
    linear_modules: int

    @classmethod
    def prepare(cls, skeleton: nn.Module, name: str, storage: StoragePlan, group: int | None = None):
        """Unfuse ``skeleton`` (meta device) and give its config the scheme's ``quantization_config``."""
        check_scheme(name)
        spec = family_spec(skeleton)
        moe_layers = len(moe_blocks(skeleton, spec))
        scheme = scheme_for(skeleton, name, group)
        with torch.device("meta"):
            native = unfuse_for(skeleton, name)
        skeleton.config.quantization_config = config_entry(scheme)
        return cls(name, scheme, native, storage, spec.layers_path, spec.block_attr, spec.experts_attr,
                   skeleton.config.hidden_act, moe_layers, len(quantized_modules(skeleton)))

    def record(self) -> dict:
        """The ``quantization`` entry of ``cdmoe.json``, as whole mode writes it."""
        return record_entry(self.name, self.scheme, self.native, self.moe_layers, self.linear_modules)

    @torch.no_grad()
    def __call__(self, idx: int, layer: nn.Module) -> dict[str, torch.Tensor]:
        """{full name: tensor to write} of decoder layer ``idx`` (``layer``, left as it is), quantised."""
        layer = copy.deepcopy(layer)
        prefix = f"{self.layers_path}.{idx}."
        for name, tensor in layer.state_dict(keep_vars=True).items():  # quantised from the values the source stores
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(self.storage.dtype_for(prefix + name, tensor)).to(tensor.dtype)
        block = getattr(layer, self.block_attr, None)
        experts = getattr(block, self.experts_attr, None) if block is not None else None
        if isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
            setattr(block, self.experts_attr, UnfusedExperts.from_fused(experts, self.hidden_act))
        freeze_scales(layer, self.scheme, torch.float32)
        compress_modules(layer, self.scheme)
        out = {}
        for name, tensor in layer.state_dict().items():
            full = prefix + name
            if name.endswith("weight_scale") or tensor.dtype in _FLOAT8 or not tensor.is_floating_point():
                out[full] = tensor.contiguous()  # fp32 scales, codes as compressed
            else:
                out[full] = tensor.to(self.storage.dtype_for(full, tensor)).contiguous()
        return out


def quantize_written(directory: Path, record: dict, name: str, *, mode: str, device, dtype: str,
                     group: int | None = None) -> dict:
    """Quantise the unquantised output just written to ``directory`` (a run's partial directory, e.g. after
    healing) in place with scheme ``name``: whole (loaded, :func:`~cdmoe.methods.compressed.quantize_compressed`)
    or sequential (one decoder layer at a time, :class:`StreamedQuantizer`), each tensor quantised from the
    values ``directory`` stores. Its weight files and config are replaced; returns ``record`` with its
    ``quantization`` entry (not yet written)."""
    import shutil

    from ..checkpoint.stream_save import meta_copy, write_streamed
    from ..memory.layer_store import SequentialStore
    from ..models.loading import checkpoint_dtype, compute_dtype, load_model
    from ..models.storage_dtypes import plan_of
    from .baselines import finish_quantized

    directory = Path(directory)
    staging = directory / ".quantised"
    shutil.rmtree(staging, ignore_errors=True)  # a killed run's
    if mode == "whole":
        model = load_model(directory, dtype=dtype, device=str(device))
        model, entry = finish_quantized(model, name, plan_of(model, directory, dtype), group)
        model.save_pretrained(staging, max_shard_size="5GB")
        del model
    else:
        compute = compute_dtype(dtype, str(device))
        if compute == "auto":  # a GPU computes in the checkpoint's dtype
            compute = checkpoint_dtype(directory) or torch.float32
        store = SequentialStore(directory, device=device, dtype=compute)
        storage = plan_of(store.model, directory, dtype)
        skeleton = meta_copy(store)
        quantizer = StreamedQuantizer.prepare(skeleton, name, storage, group)
        write_streamed(store, skeleton, {}, staging, storage, layer_tensors=quantizer)
        entry = quantizer.record()
        del store
    for old in [*directory.glob("*.safetensors"), *directory.glob("*.safetensors.index.json")]:
        old.unlink()
    for new in staging.iterdir():
        new.replace(directory / new.name)
    staging.rmdir()
    return {**record, "quantization": entry}
