"""The condensed layer (Eq. 3) and swapping it into a model.

A condensed layer computes, for every token,

    y = E_s(x) [* sigmoid(w_s . x)] + sum_{i in kept} g_i E_i(x)

with fixed gates g_i (Eq. 2) and no router. :func:`fuse_condensed_mlp` folds this into one
SwiGLU MLP: the gate/up rows of the shared and kept experts are concatenated and each
routed expert's ``down_proj`` columns are scaled by its gate, so the layer is one matmul
chain. A per-token shared-expert gate (qwen2_moe) stays exact: it scales the shared
units of the intermediate activation (see ``CondensedMLP``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import CdmoeError
from .adapter import MoEBlock, decoder_layers, family_spec, moe_blocks
from .modeling_cdmoe import CondensedMLP, condensed_classes

__all__ = ["LayerChoice", "fuse_condensed_mlp", "condense_model", "condensed_layer_spec", "to_cdmoe_format"]


@dataclass(frozen=True)
class LayerChoice:
    """What to keep in one condensed MoE layer: routed expert ids and their fixed gates g_i."""

    layer: int
    experts: tuple[int, ...]
    gates: tuple[float, ...]
    extra: dict = field(default_factory=dict, compare=False)  # e.g. token counts, search scores

    def __post_init__(self):
        if len(self.experts) != len(self.gates):
            raise CdmoeError(f"layer {self.layer}: {len(self.experts)} experts but {len(self.gates)} gates")


@torch.no_grad()
def fuse_condensed_mlp(block: MoEBlock, experts: tuple[int, ...], gates: tuple[float, ...]) -> CondensedMLP:
    """Build the fused Eq. 3 MLP of ``block`` keeping ``experts`` with fixed ``gates``."""
    if block.shared is None and not experts:
        raise CdmoeError(f"layer {block.layer_idx}: this family has no shared expert, so keep at least one routed expert")
    gate_rows, up_rows, down_cols = [], [], []
    gate_bias, up_bias, down_bias = [], [], None
    has_bias = block.shared is not None and block.shared.gate_proj.bias is not None
    if block.shared is not None:
        gate_rows.append(block.shared.gate_proj.weight.float())
        up_rows.append(block.shared.up_proj.weight.float())
        down_cols.append(block.shared.down_proj.weight.float())
        if has_bias:
            gate_bias.append(block.shared.gate_proj.bias.float())
            up_bias.append(block.shared.up_proj.bias.float())
            down_bias = block.shared.down_proj.bias.float()
    for e, g in zip(experts, gates):
        w_gate, w_up, w_down = block.expert_weights(e)
        gate_rows.append(w_gate.float())
        up_rows.append(w_up.float())
        down_cols.append(w_down.float() * g)  # fold the fixed gate into the output projection
        if has_bias:  # routed experts carry no bias
            gate_bias.append(torch.zeros(w_gate.shape[0], device=w_gate.device))
            up_bias.append(torch.zeros(w_gate.shape[0], device=w_gate.device))
    dtype = block.expert_weights(0)[0].dtype
    inter = sum(w.shape[0] for w in gate_rows)
    mlp = CondensedMLP(
        block.config.hidden_size,
        inter,
        block.config.hidden_act,
        gated_width=block.shared_intermediate_size if block.shared_gate is not None else 0,
        bias=has_bias,
    )
    device = gate_rows[0].device
    mlp.to(device=device, dtype=dtype)
    mlp.gate_proj.weight.copy_(torch.cat(gate_rows))
    mlp.up_proj.weight.copy_(torch.cat(up_rows))
    mlp.down_proj.weight.copy_(torch.cat(down_cols, dim=1))
    if has_bias:
        mlp.gate_proj.bias.copy_(torch.cat(gate_bias))
        mlp.up_proj.bias.copy_(torch.cat(up_bias))
        mlp.down_proj.bias.copy_(down_bias)
    if mlp.shared_gate is not None:
        mlp.shared_gate.weight.copy_(block.shared_gate.weight)
    return mlp


def condensed_layer_spec(mlp: CondensedMLP) -> dict:
    return {"intermediate_size": mlp.intermediate_size, "gated_width": mlp.gated_width,
            "bias": mlp.gate_proj.bias is not None}


def _native_dense_update(model, spec, new_layers: dict[int, CondensedMLP]) -> dict | None:
    """Config changes that express the condensed layers in the family's own format, or None."""
    cfg = model.config
    if spec.dense_rule is None or any(m.gated_width or m.gate_proj.bias is not None for m in new_layers.values()):
        return None
    if any(m.intermediate_size != cfg.intermediate_size for m in new_layers.values()):
        return None
    kind, key = spec.dense_rule
    if kind == "list":
        return {key: sorted(set(getattr(cfg, key, None) or []) | set(new_layers))}
    n_dense = getattr(cfg, key, 0) or 0
    wanted = set(range(n_dense)) | set(new_layers)
    if wanted == set(range(len(wanted))):
        return {key: len(wanted)}
    return None


def condense_model(model: nn.Module, choices: list[LayerChoice], *, prefer_native: bool = True) -> nn.Module:
    """Replace the chosen MoE blocks of ``model`` by fused condensed MLPs, in place.

    Returns the same model object, whose class becomes the condensed subclass of its family
    class (unless the family's own config can express the result, see ``prefer_native``),
    with ``config.cdmoe`` describing the condensed layers so that ``save_pretrained``
    writes a checkpoint that loads anywhere.
    """
    spec = family_spec(model)
    blocks = {b.layer_idx: b for b in moe_blocks(model, spec)}
    n_layers = len(decoder_layers(model, spec))
    for choice in choices:
        if not 0 <= choice.layer < n_layers:
            raise CdmoeError(f"layer {choice.layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")
        if choice.layer not in blocks:
            raise CdmoeError(f"layer {choice.layer} is not a sparse MoE layer; MoE layers are {sorted(blocks)}")
        block = blocks[choice.layer]
        if len(set(choice.experts)) != len(choice.experts):
            raise CdmoeError(f"layer {choice.layer}: expert ids repeat in {list(choice.experts)}")
        if len(choice.experts) > block.num_experts:
            raise CdmoeError(f"layer {choice.layer}: asked for {len(choice.experts)} experts but it has "
                             f"{block.num_experts} routed experts; choose K <= {block.num_experts}")
        bad = [e for e in choice.experts if not 0 <= e < block.num_experts]
        if bad:
            raise CdmoeError(
                f"layer {choice.layer}: asked for experts {list(choice.experts)} but it has {block.num_experts} routed "
                f"experts, ids 0..{block.num_experts - 1} (a record made for another model?)"
            )
    if len({c.layer for c in choices}) != len(choices):
        raise CdmoeError("a layer appears twice in the condense choices")

    new_layers = {c.layer: fuse_condensed_mlp(blocks[c.layer], c.experts, c.gates) for c in choices}
    layers = decoder_layers(model, spec)
    for idx, mlp in new_layers.items():
        setattr(layers[idx], spec.block_attr, mlp)

    native = _native_dense_update(model, spec, new_layers) if prefer_native and not hasattr(model.config, "cdmoe") else None
    if native is not None:
        for key, value in native.items():
            setattr(model.config, key, value)
        return model

    previous = getattr(model.config, "cdmoe", None) or {}
    to_cdmoe_format(model, {"condensed_layers": {
        **previous.get("condensed_layers", {}),
        **{str(i): condensed_layer_spec(m) for i, m in sorted(new_layers.items())},
    }})
    return model


def to_cdmoe_format(model: nn.Module, entries: dict) -> nn.Module:
    """Make ``model`` a cdmoe-format model (see ``modeling_cdmoe.py``) in place.

    ``entries`` (``condensed_layers``, ``dropped_layers``, ``dropped_blocks``,
    ``unfused_experts``) replace those of ``model.config.cdmoe``; the modules must already
    be in the state they describe. The class becomes the family's condensed subclass, so
    ``save_pretrained`` writes a checkpoint that loads anywhere.
    """
    spec = family_spec(model)
    old_cfg = model.config
    base_cfg_cls, base_model_cls = _base_classes(model)
    cfg_cls, model_cls = condensed_classes(base_cfg_cls, base_model_cls)
    data = old_cfg.to_dict()
    data.pop("model_type", None)
    previous = getattr(old_cfg, "cdmoe", None) or {}
    data["cdmoe"] = {
        "format_version": 1,
        "base_model_type": previous.get("base_model_type", old_cfg.model_type),
        "base_auto_map": previous.get("base_auto_map", getattr(old_cfg, "auto_map", None)),
        "layers_path": spec.layers_path,
        "block_attr": spec.block_attr,
        "experts_attr": spec.experts_attr,
        "condensed_layers": {},
        **{k: v for k, v in previous.items() if k not in ("format_version", "base_model_type", "base_auto_map")},
        **entries,
    }
    new_cfg = cfg_cls.from_dict(data)
    for key, value in vars(old_cfg).items():  # runtime settings such as _attn_implementation
        if key.startswith("_"):
            new_cfg.__dict__[key] = value
    for module in model.modules():
        if getattr(module, "config", None) is old_cfg:
            module.config = new_cfg
    model.__class__ = model_cls
    return model


def _base_classes(model: nn.Module) -> tuple[type, type]:
    """The family's own (config class, model class), also for an already condensed model."""
    model_cls = type(model)
    if getattr(model.config, "cdmoe", None) is not None:
        model_cls = model_cls.__mro__[1]
        return type(model.config).__mro__[1], model_cls
    return type(model.config), model_cls
