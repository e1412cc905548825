"""The modules that take a condensed or dropped MoE block's place in a vLLM decoder layer.

:func:`condensed_mlp` builds the family's own vLLM dense MLP class (merged
column-parallel ``gate_up_proj``, row-parallel ``down_proj``, SiLU-and-mul) at the
condensed width, plus, for a per-token shared-expert gate (qwen2_moe), a replicated
``shared_gate`` applied to the first ``gated_width`` intermediate units only (Eq. 3 with
the gate kept exact: ``down(h * m)``, ``m = sigmoid(shared_gate(x))`` on those units).

Shapes: x (T, hidden_size) -> (T, hidden_size); gate_up_proj (2 * I / tp, H) per rank,
down_proj (H, I / tp), shared_gate (1, H). With ``sequence_parallel`` (vLLM's sequence-parallel
MoE: expert + data parallel, TP > 1) the weights are replicated instead (``is_sequence_parallel``
of vLLM's DeepseekV2MLP, as its shared experts there): each rank gets its own chunk of tokens
(``already_sequence_parallel=True``) and returns their full output, with no collective.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache

import torch
from torch import nn
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

__all__ = ["DroppedMLP", "condensed_mlp"]

# checkpoint projection names (cdmoe/HF names and Mixtral's w1/w3/w2) -> merged shard id
_GATE_UP_SHARDS = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1}
_DOWN = {"down_proj", "w2"}


class DroppedMLP(nn.Module):
    """An MoE sub-layer removed (Layer Drop): adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class _CondensedMixin:
    """Adds the partial shared-expert gate and name-tolerant weight loading to a dense MLP."""

    def _init_gate(self, hidden_size: int, intermediate_size: int, gated_width: int, prefix: str,
                   sequence_parallel: bool) -> None:
        self.full_shape = (intermediate_size, hidden_size)  # of gate_proj / up_proj before TP
        self.sequence_parallel = sequence_parallel
        self.gated_width = gated_width
        self.shared_gate = (
            ReplicatedLinear(hidden_size, 1, bias=False, prefix=f"{prefix}.shared_gate") if gated_width else None
        )

    def forward(self, x: torch.Tensor, already_sequence_parallel: bool = False) -> torch.Tensor:
        """``already_sequence_parallel``: ``x`` is this rank's chunk of the tokens (vLLM's DeepseekV2
        decoder layer under sequence-parallel MoE); right only with replicated weights."""
        assert self.sequence_parallel or not already_sequence_parallel, "a token chunk reached a TP-sharded MLP"
        if self.shared_gate is None:
            return super().forward(x)
        gate_up, _ = self.gate_up_proj(x)
        h = self.act_fn(gate_up)  # (T, I / tp): this rank's intermediate units
        first = self.down_proj.tp_rank * self.down_proj.input_size_per_partition
        units = torch.arange(first, first + h.shape[-1], device=h.device)
        gate = torch.sigmoid(self.shared_gate(x)[0])  # (T, 1)
        h = torch.where(units < self.gated_width, h * gate, h)
        out, _ = self.down_proj(h)
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load ``gate_proj``/``up_proj``/``down_proj`` (or ``w1``/``w3``/``w2``, ``gate_up_proj``
        with a ``shard_id``) and ``shared_gate`` tensors, names relative to this module: ``weight``, and
        for a quantised checkpoint compressed-tensors' ``weight_scale``, ``weight_packed``, ... of each."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            stem, _, suffix = name.partition(".")
            # vLLM's sharded loaders narrow a too-large tensor silently: check the full shape
            expected = self.full_shape[::-1] if stem in _DOWN else self.full_shape  # gate/up (shard): (I, H)
            if stem != "shared_gate" and suffix == "weight" and tuple(tensor.shape) != expected:
                raise ValueError(f"cdmoe-vllm: {name} has shape {tuple(tensor.shape)}, the condensed layer expects {expected}")
            target = ("gate_up_proj" if stem in _GATE_UP_SHARDS or stem == "gate_up_proj" else
                      "down_proj" if stem in _DOWN else stem) + f".{suffix}"
            if target not in params or (stem == "shared_gate" and suffix != "weight"):
                raise ValueError(f"cdmoe-vllm: unexpected weight {name!r} for a condensed MLP")
            param = params[target]
            loader = getattr(param, "weight_loader", default_weight_loader)
            if target.startswith("gate_up_proj."):
                loader(param, tensor, _GATE_UP_SHARDS.get(stem, getattr(tensor, "shard_id", None)))
            else:
                loader(param, tensor)
            loaded.add(target)
        return loaded


@cache
def _condensed_class(dense_cls: type) -> type:
    return type(f"Condensed{dense_cls.__name__}", (_CondensedMixin, dense_cls), {"__module__": __name__})


def condensed_mlp(
    dense_cls: type, hidden_size: int, intermediate_size: int, hidden_act: str, gated_width: int, quant_config,
    prefix: str, sequence_parallel: bool = False,
) -> nn.Module:
    """An instance of (a subclass of) ``dense_cls``, vLLM's dense MLP of the family; with
    ``sequence_parallel``, built replicated (``dense_cls`` must take ``is_sequence_parallel``)."""
    mlp = _condensed_class(dense_cls)(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        hidden_act=hidden_act,
        quant_config=quant_config,
        prefix=prefix,
        **({"is_sequence_parallel": True} if sequence_parallel else {}),
    )
    mlp._init_gate(hidden_size, intermediate_size, gated_width, prefix, sequence_parallel)
    return mlp
