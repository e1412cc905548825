"""Parameter accounting: totals, MoE-layer breakdown, activated parameters, memory ratio.

Counts are of the tensors a checkpoint stores (parameters, tied ones once, plus
persistent buffers such as DeepSeek-V3's ``e_score_correction_bias``). The memory ratio
is condensed total / original total: the whole checkpoint, embeddings and attention
included, as the paper's MEM column. Activated parameters per token count every
non-expert tensor plus, in each sparse layer, the router, the shared experts and top-k
routed experts; a condensed layer is fully active.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from .adapter import MoEBlock, decoder_layers, family_spec, moe_blocks

__all__ = ["MoELayerParams", "ModelParams", "tensor_count", "tensor_sizes", "model_params"]


def tensor_count(module: nn.Module | None) -> int:
    """Elements of the parameters (shared ones once) and persistent buffers of ``module``."""
    if module is None:
        return 0
    total = sum(p.numel() for p in module.parameters())
    for mod in module.modules():
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and name not in mod._non_persistent_buffers_set:
                total += buf.numel()
    return total


@dataclass(frozen=True)
class MoELayerParams:
    """Sizes of one sparse MoE layer, in elements."""

    layer: int
    num_experts: int  # routed experts stored (E'_l after M-SMoE merging; the router keeps its rows)
    top_k: int
    expert: int  # one routed expert: 3 * H * I
    expert_intermediate: int
    shared: int  # shared expert(s) and their gate
    other: int  # router and its buffers: removed by condensing
    shared_bias: bool = False

    @property
    def total(self) -> int:
        return self.other + self.num_experts * self.expert + self.shared

    @property
    def active(self) -> int:
        return self.other + min(self.top_k, self.num_experts) * self.expert + self.shared

    def condensed(self, k: int) -> int:
        """Elements of the condensed MLP keeping k routed experts (Eq. 3)."""
        return self.shared + k * self.expert + (2 * k * self.expert_intermediate if self.shared_bias else 0)

    @classmethod
    def of_block(cls, block: MoEBlock) -> MoELayerParams:
        expert = sum(w.numel() for w in block.expert_weights(0))
        shared = tensor_count(block.shared) + tensor_count(block.shared_gate)
        total = tensor_count(block.module)
        return cls(
            layer=block.layer_idx,
            num_experts=block.stored_experts,
            top_k=block.top_k,
            expert=expert,
            expert_intermediate=block.expert_weights(0)[0].shape[0],
            shared=shared,
            other=total - block.stored_experts * expert - shared,
            shared_bias=block.shared is not None and block.shared.gate_proj.bias is not None,
        )


@dataclass(frozen=True)
class ModelParams:
    """A model's total and its sparse MoE layers; answers 'what if these layers were condensed'."""

    total: int
    layers: tuple[MoELayerParams, ...]
    blocks: tuple[int, ...] = ()  # elements of each decoder layer (Block Drop); empty if unknown
    largest_layer: int = 0  # the largest decoder layer (what sequential mode holds at once)
    non_layer: int = 0  # embeddings, final norm, lm_head (tied once): always resident in sequential mode
    num_layers: int = 0  # decoder layers
    hidden_size: int = 0
    vocab_size: int = 0
    attention_heads: int = 0
    # tensor sizes (elements, largest first) of each distinct kind of decoder layer and of the rest:
    # what loading one tensor at a time holds (cdmoe.memory.estimate.load_peak)
    layer_tensors: tuple[tuple[int, ...], ...] = ()
    non_layer_tensors: tuple[int, ...] = ()
    largest_source: int = 0  # the largest checkpoint tensor of a layer (one expert's matrix of a fused tensor)

    @property
    def moe_layer_ids(self) -> list[int]:
        return [layer.layer for layer in self.layers]

    @property
    def active(self) -> int:
        return self.total - sum(layer.total - layer.active for layer in self.layers)

    def _layer(self, idx: int) -> MoELayerParams:
        return next(layer for layer in self.layers if layer.layer == idx)

    def condensed_total(self, condensed: dict[int, int]) -> int:
        """Total elements after condensing ``{layer: K}``."""
        return self.total - sum(self._layer(i).total - self._layer(i).condensed(k) for i, k in condensed.items())

    def condensed_active(self, condensed: dict[int, int]) -> int:
        return self.active - sum(self._layer(i).active - self._layer(i).condensed(k) for i, k in condensed.items())

    def routed_total(self, layers: list[int] | None = None) -> int:
        """Elements of the routed experts of ``layers`` (default: every MoE layer)."""
        chosen = self.layers if layers is None else [self._layer(i) for i in layers]
        return sum(layer.num_experts * layer.expert for layer in chosen)

    def layer_dropped_total(self, layers: list[int]) -> int:
        """Total elements after removing the MoE sub-layers ``layers`` (Layer Drop)."""
        return self.total - sum(self._layer(i).total for i in layers)

    def block_dropped_total(self, blocks: list[int]) -> int:
        """Total elements after removing decoder layers ``blocks`` (Block Drop)."""
        return self.total - sum(self.blocks[i] for i in blocks)

    def experts_reduced_total(self, kept: int) -> int:
        """Total elements with ``kept`` routed experts in every MoE layer, router rows included."""
        return self.total - sum(
            (layer.num_experts - kept) * layer.expert + layer.other - layer.other * kept // layer.num_experts
            for layer in self.layers
        )

    def experts_merged_total(self, groups: dict[int, int]) -> int:
        """Total elements with ``groups[l]`` routed experts stored in MoE layer l, full routers kept (M-SMoE)."""
        return self.total - sum((self._layer(i).num_experts - n) * self._layer(i).expert for i, n in groups.items())

    def summary(self, condensed: dict[int, int], bytes_per_param: float) -> dict:
        after = self.condensed_total(condensed)
        return {
            "total_params": self.total,
            "condensed_params": after,
            "memory_ratio": after / self.total,
            "active_params": self.active,
            "condensed_active_params": self.condensed_active(condensed),
            "total_bytes": int(self.total * bytes_per_param),
            "condensed_bytes": int(after * bytes_per_param),
            "moe_layers": len(self.layers),
            "condensed_layers": sorted(condensed),
        }

    def to_dict(self) -> dict:
        return {"total": self.total, "layers": [asdict(layer) for layer in self.layers]}

    def change_to(self, after: ModelParams) -> dict:
        """The record's ``params`` entry of a method that made this model ``after``."""
        return {"total_params": self.total, "condensed_params": after.total, "memory_ratio": after.total / self.total,
                "active_params": self.active, "condensed_active_params": after.active}


def tensor_sizes(module: nn.Module) -> tuple[int, ...]:
    """Elements of each parameter (shared ones once) and persistent buffer of ``module``, largest first."""
    sizes = [p.numel() for p in module.parameters()]
    for mod in module.modules():
        sizes += [buf.numel() for name, buf in mod.named_buffers(recurse=False)
                  if buf is not None and name not in mod._non_persistent_buffers_set]
    return tuple(sorted(sizes, reverse=True))


def model_params(model: nn.Module) -> ModelParams:
    """Count a (possibly meta-device) model."""
    spec = family_spec(model)
    layers = decoder_layers(model, spec)
    sizes = [tensor_count(layer) for layer in layers]
    total = tensor_count(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    rest = sorted((p.numel() for p in model.parameters() if id(p) not in in_layers), reverse=True)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return ModelParams(total=total, layers=tuple(MoELayerParams.of_block(b) for b in moe_blocks(model, spec)),
                       largest_layer=max(sizes), non_layer=total - sum(sizes), num_layers=len(sizes),
                       hidden_size=model.config.hidden_size, blocks=tuple(sizes),
                       vocab_size=getattr(config, "vocab_size", 0) or 0,
                       attention_heads=getattr(config, "num_attention_heads", 0) or 0,
                       layer_tensors=tuple(dict.fromkeys(tensor_sizes(layer) for layer in layers)),
                       non_layer_tensors=tuple(rest),
                       largest_source=max(p.numel() // (p.shape[0] if p.dim() == 3 else 1)
                                          for layer in layers for p in layer.parameters()))
