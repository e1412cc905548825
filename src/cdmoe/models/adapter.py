"""A family-independent view of one sparse MoE block.

:class:`MoEBlock` reads a block through its :class:`~cdmoe.models.families.FamilySpec`:
routing exactly as the family computes it (Eq. 1's top-k set and gates g_{i,t}), each
routed expert's SwiGLU weights (fused 3-D tensors or one module per expert, detected
structurally), the shared expert(s) and any per-token shared-expert gate.

Notation: T tokens, H hidden size, E routed experts, K top-k, I expert intermediate size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from ..errors import CdmoeError
from .families import FamilySpec, probe_spec, spec_for_model_type, supported_model_types

__all__ = ["Routing", "MoEBlock", "attr_path", "family_spec", "moe_blocks", "decoder_layers", "config_value"]


def attr_path(obj, path: str):
    """``obj.a.b.c`` for ``path`` 'a.b.c'."""
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def config_value(config, keys: tuple[str, ...] | str, default=None):
    """First of ``keys`` that the config defines (not None)."""
    for key in (keys,) if isinstance(keys, str) else keys:
        value = getattr(config, key, None)
        if value is not None:
            return value
    return default


def decoder_layers(model: nn.Module, spec: FamilySpec) -> nn.ModuleList:
    return attr_path(model, spec.layers_path)


def family_spec(model: nn.Module) -> FamilySpec:
    """The spec of ``model``'s family: listed by model_type (a cdmoe-format model's base model type), else
    probed structurally."""
    config = model.config
    listed = spec_for_model_type((getattr(config, "cdmoe", None) or {}).get("base_model_type", config.model_type))
    if listed is not None:
        return listed
    layers = getattr(getattr(model, "model", None), "layers", None)
    for layer in layers or []:
        block = getattr(layer, "mlp", None)
        if block is not None and hasattr(block, "experts"):
            probed = probe_spec(config, block)
            if probed is not None:
                return probed
    if layers is not None and not any(hasattr(getattr(layer, "mlp", None), "experts") for layer in layers):
        raise CdmoeError(
            f"{config.model_type!r} has no sparse MoE layer (a dense model?); cdmoe condenses MoE models such as "
            f"{', '.join(supported_model_types())}"
        )
    raise CdmoeError(
        f"unsupported model family {config.model_type!r}; supported: {', '.join(supported_model_types())}, "
        "or any model whose decoder layers have mlp.gate / mlp.experts (/ mlp.shared_experts)"
    )


@dataclass
class Routing:
    """Routing of T tokens: ``indices`` (T, K) long, ``gates`` (T, K) fp32 (g_{i,t} of Eq. 1,
    after the family's renormalisation and scaling), ``scores`` (T, E) fp32 before top-k."""

    indices: torch.Tensor
    gates: torch.Tensor
    scores: torch.Tensor

    def dense_gates(self, num_experts: int) -> torch.Tensor:
        """g_{i,t} as a (T, E) matrix with zeros for unselected experts."""
        out = torch.zeros(self.indices.shape[0], num_experts, dtype=self.gates.dtype, device=self.gates.device)
        return out.scatter_(1, self.indices, self.gates)


class MoEBlock:
    """One sparse MoE block of a decoder layer, seen through its family spec."""

    def __init__(self, layer_idx: int, module: nn.Module, spec: FamilySpec, config):
        self.layer_idx = layer_idx
        self.module = module
        self.spec = spec
        self.config = config
        self.router = getattr(module, spec.router_attr)
        self.experts = getattr(module, spec.experts_attr)
        self.shared = getattr(module, spec.shared_attr, None) if spec.shared_attr else None
        self.shared_gate = getattr(module, spec.shared_gate_attr, None) if spec.shared_gate_attr else None
        self.act_fn = getattr(self.experts, "act_fn", None) or ACT2FN[config.hidden_act]
        self.fused = isinstance(getattr(self.experts, "gate_up_proj", None), torch.Tensor)
        if not self.fused and not isinstance(self.experts, nn.ModuleList):
            raise CdmoeError(f"layer {layer_idx}: unrecognised expert layout {type(self.experts).__name__}")

    # sizes -----------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return self.router_weight.shape[0]

    @property
    def stored_experts(self) -> int:
        """Routed experts the block holds: E, or E'_l after M-SMoE merging (the router keeps E rows)."""
        merged = getattr(self.module, "cdmoe_expert_map", None)
        return self.num_experts if merged is None else max(merged) + 1

    @property
    def top_k(self) -> int:
        k = getattr(self.config, self.spec.top_k_key)
        return k[self.layer_idx] if isinstance(k, (list, tuple)) else int(k)

    @property
    def expert_intermediate_size(self) -> int:
        return self.expert_weights(0)[0].shape[0]

    @property
    def shared_intermediate_size(self) -> int:
        return 0 if self.shared is None else self.shared.gate_proj.weight.shape[0]

    @property
    def routed_scale(self) -> float:
        """The family's routed scaling factor (1.0 when it has none): the last factor of every gate."""
        key = self.spec.routing.scaling_key
        return 1.0 if key is None else float(getattr(self.config, key) or 1.0)

    @property
    def routing_groups(self) -> int:
        """G of group-limited routing (experts in G equal groups of consecutive ids, only the best
        ``topk_group`` groups chosen per token), 1 when the family or its config does not limit groups."""
        r = self.spec.routing
        on = r.group_score is not None and (r.group_when is None
                                            or getattr(self.config, r.group_when[0], None) == r.group_when[1])
        return int(getattr(self.config, "n_group", 1) or 1) if on else 1

    @property
    def router_weight(self) -> torch.Tensor:
        return attr_path(self.router, self.spec.router_weight)  # (E, H)

    # routing (Eq. 1) ---------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> Routing:
        """Top-k indices and gates for x (T, H), as the family's router computes them."""
        r, cfg = self.spec.routing, self.config
        weight = self.router_weight
        if r.logits_fp32 or weight.dtype == torch.float32:
            logits = F.linear(x.float(), weight.float())
        else:
            logits = F.linear(x.to(weight.dtype), weight).float()
        scores = logits.softmax(-1) if r.score == "softmax" else logits.sigmoid()  # (T, E)
        choice = scores
        if r.correction_bias is not None:
            choice = scores + attr_path(self.router, r.correction_bias).float().reshape(-1)
        n_group = self.routing_groups
        if n_group > 1:
            grouped = choice.view(choice.shape[0], n_group, -1)  # (T, G, E/G)
            group_scores = grouped.max(-1).values if r.group_score == "max" else grouped.topk(2, -1).values.sum(-1)
            keep = group_scores.topk(cfg.topk_group, dim=-1).indices
            mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = choice.masked_fill(~mask.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        indices = choice.topk(self.top_k, dim=-1).indices  # (T, K)
        gates = scores.gather(1, indices)
        renorm = r.renormalize == "always" or (r.renormalize == "config" and getattr(cfg, "norm_topk_prob", False))
        if renorm:
            denom = gates.sum(-1, keepdim=True) + r.renorm_eps
            if r.renorm_min_key is not None:
                denom = denom.clamp(min=getattr(cfg, r.renorm_min_key))
            gates = gates / denom
        if r.scaling_key is not None:
            gates = gates * self.routed_scale
        return Routing(indices=indices, gates=gates, scores=scores)

    # experts -----------------------------------------------------------------------------
    def expert_weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert e's (gate (I, H), up (I, H), down (H, I)) weights."""
        if self.fused:
            gate_up = self.experts.gate_up_proj[e]  # (2I, H), gate rows first
            inter = gate_up.shape[0] // 2
            return gate_up[:inter], gate_up[inter:], self.experts.down_proj[e]
        module = self.experts[e]
        names = ("gate_proj", "up_proj", "down_proj") if hasattr(module, "gate_proj") else ("w1", "w3", "w2")
        return tuple(getattr(module, n).weight for n in names)  # type: ignore[return-value]

    def expert_output(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """E_e(x) for x (T, H) -> (T, H), ungated."""
        gate, up, down = self.expert_weights(e)
        x = x.to(gate.dtype)
        return F.linear(self.act_fn(F.linear(x, gate)) * F.linear(x, up), down)

    def shared_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """The shared expert(s) output E_s(x) (T, H), times the per-token gate if the family has one."""
        if self.shared is None:
            return None
        out = self.shared(x)
        if self.shared_gate is not None:
            out = torch.sigmoid(self.shared_gate(x)) * out
        return out


def moe_blocks(model: nn.Module, spec: FamilySpec | None = None) -> list[MoEBlock]:
    """Every sparse MoE block of ``model`` in layer order (dense and condensed layers skipped)."""
    spec = spec or family_spec(model)
    blocks = []
    for idx, layer in enumerate(decoder_layers(model, spec)):
        block = getattr(layer, spec.block_attr, None)
        if block is not None and hasattr(block, spec.experts_attr) and hasattr(block, spec.router_attr):
            blocks.append(MoEBlock(idx, block, spec, model.config))
    return blocks
