"""Bytes of a planned checkpoint on disk, per MoE layer and action, before anything is written.

A memory budget is a ratio of the original's weight bytes as ``cdmoe compare`` measures them (the
safetensors files of its directory, headers included), and a ceiling. :class:`ByteTable` predicts a
planned output's bytes as the sum of

- tensor bytes, exact: every tensor's elements x the bytes of the dtype it is stored in (the
  :class:`~cdmoe.models.storage_dtypes.StoragePlan`: the source's dtype per tensor, the checkpoint's
  dtype for new tensors such as a condensed MLP's); a pruned layer keeps E_l / E of its router rows
  and experts; a condensed layer is the CondensedMLP of Eq. 3; a dropped one stores nothing;
- a bound on the safetensors headers: per tensor entry its name plus :data:`ENTRY_BYTES` (the JSON of
  dtype, shape and two offsets, and room for the longer names of a family's on-disk layout, such
  as Mixtral's ``block_sparse_moe``), routed experts counted as 3 entries each (per-expert names, as
  a native checkpoint stores them), and :data:`FILE_BYTES` per file for up to one file per decoder
  layer plus two (a sequential run's shards).

With ``quantize`` (``w8a8 | w4a16 | fp8``), the weights compressed-tensors quantises are priced as
stored (:class:`~cdmoe.models.compressed_bytes.QuantBytes`: codes and scales, each a header entry),
routed experts as one linear per expert and projection; everything else as above.

So the written bytes never exceed the prediction, and the tensor part is what is written, byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapter import MoEBlock, decoder_layers, family_spec, moe_blocks
from .compressed_bytes import QuantBytes, input_widths, is_quantised, w4a16_group
from .mixed import LayerAction
from .modeling_cdmoe import CondensedMLP
from .storage_dtypes import StoragePlan

__all__ = ["ENTRY_BYTES", "FILE_BYTES", "ByteTable"]

ENTRY_BYTES = 128  # one header entry beyond its name: {"dtype":"BF16","shape":[..],"data_offsets":[..,..]} + renames
FILE_BYTES = 64  # per file: the 8-byte length, {"__metadata__":{"format":"pt"}} and padding to 8 bytes


def _tensors(module: nn.Module, prefix: str) -> list[tuple[str, torch.Tensor, nn.Module]]:
    """(state-dict name, tensor, owning module) of the parameters and persistent buffers of ``module``,
    tied ones once."""
    seen, out = set(), []
    for mod_name, mod in module.named_modules():
        persistent = [(n, b) for n, b in mod._buffers.items() if n not in mod._non_persistent_buffers_set]
        for name, tensor in list(mod._parameters.items()) + persistent:
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            out.append((f"{prefix}{mod_name}.{name}" if mod_name else f"{prefix}{name}", tensor, mod))
    return out


def _quantised(name: str, tensor: torch.Tensor, owner: nn.Module, quant: QuantBytes | None) -> int | None:
    """Stored bytes of ``tensor`` once quantised under ``quant``, or None when it stays as stored."""
    if quant is None:
        return None
    if getattr(owner, "weight", None) is tensor and is_quantised(name.removesuffix(".weight"), owner):
        return quant.linear(*tensor.shape)
    if not isinstance(owner, nn.Linear) and owner is not None and name.endswith(("gate_up_proj", "down_proj")):
        return quant.fused_experts(name, tensor)
    return None


def _bytes(entries, storage: StoragePlan, quant: QuantBytes | None = None) -> int:
    total = 0
    for name, t, owner in entries:
        q = _quantised(name, t, owner, quant)
        total += t.numel() * storage.dtype_for(name, t).itemsize if q is None else q
    return total


def _header(entries, copies: int = 1, quant: QuantBytes | None = None) -> int:
    """Bound on the header entries of ``entries``: a quantised weight is one entry per stored tensor."""
    total = 0
    for name, t, owner in entries:
        names = 1 if _quantised(name, t, owner, quant) is None else len(quant.entries)
        total += copies * names * (len(name) + len("_packed") + ENTRY_BYTES)
    return total


@dataclass
class ByteTable:
    """Predicted bytes of ``model`` and of its MoE layers under each action, in ``storage``'s dtypes
    (``quantize``: then quantised by compressed-tensors' scheme of that name).

    ``fixed``: everything outside the MoE blocks (embeddings, attention, norms, dense layers, headers
    and per-file overhead); :meth:`action` one MoE layer's block; :meth:`total` a whole plan.
    """

    model: nn.Module
    storage: StoragePlan
    quantize: str | None = None

    def __post_init__(self):
        self.spec = family_spec(self.model)
        self.blocks = {b.layer_idx: b for b in moe_blocks(self.model, self.spec)}
        self.quant = None
        if self.quantize is not None:  # w4a16's group: from the source's input widths
            group = w4a16_group(input_widths(self.model)) if self.quantize == "w4a16" else None
            self.quant = QuantBytes(self.quantize, group)
        inside = {id(t) for b in self.blocks.values() for _, t, _ in _tensors(b.module, "")}
        rest = [e for e in _tensors(self.model, "") if id(e[1]) not in inside]
        files = len(decoder_layers(self.model, self.spec)) + 2
        self.fixed_tensors = _bytes(rest, self.storage, self.quant)
        self.fixed = self.fixed_tensors + _header(rest, quant=self.quant) + files * FILE_BYTES
        self._cache: dict[tuple[int, str], tuple[int, int]] = {}

    @property
    def group(self) -> int | None:
        """w4a16's group size the table prices (from the source's input widths); None for other schemes."""
        return self.quant.group if self.quant is not None else None

    def prefix(self, layer: int) -> str:
        return f"{self.spec.layers_path}.{layer}.{self.spec.block_attr}."

    def action(self, layer: int, action: LayerAction) -> int:
        """Bytes (tensors + header bound) of MoE layer ``layer``'s block under ``action``."""
        return sum(self.parts(layer, action))

    def parts(self, layer: int, action: LayerAction) -> tuple[int, int]:
        """(tensor bytes, header bound) of MoE layer ``layer``'s block under ``action``."""
        key = (layer, action.label)
        if key not in self._cache:
            self._cache[key] = self._parts(self.blocks[layer], action)
        return self._cache[key]

    def _parts(self, block: MoEBlock, action: LayerAction) -> tuple[int, int]:
        prefix, quant = self.prefix(block.layer_idx), self.quant
        if action.kind == "drop":
            return 0, 0
        if action.kind == "condense":
            with torch.device("meta"):
                mlp = CondensedMLP(block.config.hidden_size, block.shared_intermediate_size
                                   + len(action.experts) * block.expert_intermediate_size, block.config.hidden_act,
                                   block.shared_intermediate_size if block.shared_gate is not None else 0,
                                   block.shared is not None and block.shared.gate_proj.bias is not None)
            entries = _tensors(mlp, prefix)
            return _bytes(entries, self.storage, quant), _header(entries, quant=quant)
        num = block.num_experts
        kept = num if action.kind == "keep" else len(action.experts)
        routed, router = f"{prefix}{self.spec.experts_attr}.", f"{prefix}{self.spec.router_attr}."
        entries = _tensors(block.module, prefix)
        # tensors with one slice per routed expert: the router's rows, fused experts (E, ...), per-expert modules
        rows = [e for e in entries if e[0].startswith(routed) or (e[0].startswith(router) and e[1].shape[:1] == (num,))]
        in_rows = {e[0] for e in rows}
        rest = [e for e in entries if e[0] not in in_rows]
        if block.fused:
            names_per_expert = sum(2 if "gate_up" in n else 1 for n, *_ in rows if n.startswith(routed))
        else:
            names_per_expert = sum(1 for n, *_ in rows if n.startswith(f"{routed}0."))
        per_name = 1 if quant is None else len(quant.entries)  # a quantised expert weight: codes, scales (, shape)
        expert_names = [(f"{routed}{num - 1}.gate_proj.weight", None, None)] * (names_per_expert * kept * per_name)
        router_rows = [e for e in rows if not e[0].startswith(routed)]
        # every slice the same size
        tensors = _bytes(rest, self.storage, quant) + _bytes(rows, self.storage, quant) * kept // num
        return tensors, _header(rest, quant=quant) + _header(router_rows, quant=quant) + _header(expert_names)

    def total(self, plan: dict[int, LayerAction], tensors_only: bool = False) -> int:
        """Predicted bytes of the whole output under ``plan`` ({MoE layer: action}; others kept): tensors plus
        the header bound, or (``tensors_only``) exactly the tensor bytes that will be written."""
        parts = [self.parts(layer, plan.get(layer, LayerAction())) for layer in self.blocks]
        if tensors_only:
            return self.fixed_tensors + sum(t for t, _ in parts)
        return self.fixed + sum(t + h for t, h in parts)
