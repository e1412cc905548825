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

So the written bytes never exceed the prediction, and the tensor part is what is written, byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapter import MoEBlock, decoder_layers, family_spec, moe_blocks
from .mixed import LayerAction
from .modeling_cdmoe import CondensedMLP
from .storage_dtypes import StoragePlan

__all__ = ["ENTRY_BYTES", "FILE_BYTES", "ByteTable"]

ENTRY_BYTES = 128  # one header entry beyond its name: {"dtype":"BF16","shape":[..],"data_offsets":[..,..]} + renames
FILE_BYTES = 64  # per file: the 8-byte length, {"__metadata__":{"format":"pt"}} and padding to 8 bytes


def _tensors(module: nn.Module, prefix: str) -> list[tuple[str, torch.Tensor]]:
    """(state-dict name, tensor) of the parameters and persistent buffers of ``module``, tied ones once."""
    seen, out = set(), []
    for mod_name, mod in module.named_modules():
        persistent = [(n, b) for n, b in mod._buffers.items() if n not in mod._non_persistent_buffers_set]
        for name, tensor in list(mod._parameters.items()) + persistent:
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            out.append((f"{prefix}{mod_name}.{name}" if mod_name else f"{prefix}{name}", tensor))
    return out


def _bytes(entries, storage: StoragePlan) -> int:
    return sum(t.numel() * storage.dtype_for(name, t).itemsize for name, t in entries)


def _header(entries, copies: int = 1) -> int:
    return sum(copies * (len(name) + ENTRY_BYTES) for name, _ in entries)


@dataclass
class ByteTable:
    """Predicted bytes of ``model`` and of its MoE layers under each action, in ``storage``'s dtypes.

    ``fixed``: everything outside the MoE blocks (embeddings, attention, norms, dense layers, headers
    and per-file overhead); :meth:`action` one MoE layer's block; :meth:`total` a whole plan.
    """

    model: nn.Module
    storage: StoragePlan

    def __post_init__(self):
        self.spec = family_spec(self.model)
        self.blocks = {b.layer_idx: b for b in moe_blocks(self.model, self.spec)}
        inside = {id(t) for b in self.blocks.values() for _, t in _tensors(b.module, "")}
        rest = [(n, t) for n, t in _tensors(self.model, "") if id(t) not in inside]
        files = len(decoder_layers(self.model, self.spec)) + 2
        self.fixed_tensors = _bytes(rest, self.storage)
        self.fixed = self.fixed_tensors + _header(rest) + files * FILE_BYTES
        self._cache: dict[tuple[int, str], tuple[int, int]] = {}

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
        prefix = self.prefix(block.layer_idx)
        if action.kind == "drop":
            return 0, 0
        if action.kind == "condense":
            with torch.device("meta"):
                mlp = CondensedMLP(block.config.hidden_size, block.shared_intermediate_size
                                   + len(action.experts) * block.expert_intermediate_size, block.config.hidden_act,
                                   block.shared_intermediate_size if block.shared_gate is not None else 0,
                                   block.shared is not None and block.shared.gate_proj.bias is not None)
            entries = _tensors(mlp, prefix)
            return _bytes(entries, self.storage), _header(entries)
        num = block.num_experts
        kept = num if action.kind == "keep" else len(action.experts)
        routed, router = f"{prefix}{self.spec.experts_attr}.", f"{prefix}{self.spec.router_attr}."
        entries = _tensors(block.module, prefix)
        # tensors with one slice per routed expert: the router's rows, fused experts (E, ...), per-expert modules
        rows = [(n, t) for n, t in entries if n.startswith(routed) or (n.startswith(router) and t.shape[:1] == (num,))]
        in_rows = {n for n, _ in rows}
        rest = [(n, t) for n, t in entries if n not in in_rows]
        if block.fused:
            names_per_expert = sum(2 if "gate_up" in n else 1 for n, _ in rows if n.startswith(routed))
        else:
            names_per_expert = sum(1 for n, _ in rows if n.startswith(f"{routed}0."))
        expert_names = [(f"{routed}{num - 1}.gate_proj.weight", None)] * (names_per_expert * kept)
        router_rows = [(n, t) for n, t in rows if not n.startswith(routed)]
        tensors = _bytes(rest, self.storage) + _bytes(rows, self.storage) * kept // num  # every slice the same size
        return tensors, _header(rest) + _header(router_rows) + _header(expert_names)

    def total(self, plan: dict[int, LayerAction], tensors_only: bool = False) -> int:
        """Predicted bytes of the whole output under ``plan`` ({MoE layer: action}; others kept): tensors plus
        the header bound, or (``tensors_only``) exactly the tensor bytes that will be written."""
        parts = [self.parts(layer, plan.get(layer, LayerAction())) for layer in self.blocks]
        if tensors_only:
            return self.fixed_tensors + sum(t for t, _ in parts)
        return self.fixed + sum(t + h for t, h in parts)
