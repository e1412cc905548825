"""Modelling code of a cdmoe condensed checkpoint (CD-MoE, arXiv 2412.00069).

This file is self-contained: it imports only torch and transformers. cdmoe copies it
verbatim into every output directory, so the directory loads with

    AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)

where cdmoe is not installed, and with plain ``from_pretrained(out_dir)`` after
``import cdmoe`` (which registers the same classes with the Auto API).

A condensed checkpoint is the original model with some sparse MoE blocks replaced by a
:class:`CondensedMLP` (the paper's Eq. 3): the shared experts plus K routed experts with
fixed gates, applied to every token, no router. Everything else (attention, the other
MoE blocks, weight names) is the original family's own code: the loaded model is an
instance of a subclass of the family's ``*ForCausalLM`` class.

``config.json`` holds the family's configuration plus a ``cdmoe`` entry::

    "cdmoe": {
      "format_version": 1,
      "base_model_type": "deepseek_v2",
      "base_auto_map": null,            # or the base checkpoint's auto_map for remote-code families
      "layers_path": "model.layers",    # attribute path of the decoder layer list
      "block_attr": "mlp",              # attribute of the decoder layer that holds the MoE block
      "condensed_layers": {"3": {"intermediate_size": 224, "gated_width": 0, "bias": false}},
      "dropped_layers": [5],            # optional: MoE sub-layer removed (Layer Drop)
      "dropped_blocks": [6],            # optional: whole decoder layer removed (Block Drop)
      "unfused_experts": [1, 2],        # optional: routed experts as one nn.Linear trio per expert
      "checkpoint_keys": "family",      # optional: the family's on-disk keys (FP8 outputs: one tensor per expert)
      "router_attr": "gate",            # with merged_experts: attribute of the block that holds the router
      "merged_experts": {"4": {"num_experts": 3, "expert_map": [0, 0, 1, 2, 1, 0, 2, 2]}}
    }

Merged experts (M-SMoE, Li et al. arXiv 2310.01334, as MC-SMoE's ``grouping_mixtral.py`` runs
it): the layer keeps its full router (all E rows, weights unchanged) but stores only
``num_experts`` = E'_l experts; after the family's own routing (top-k ids over all E experts
and their gates), each id e is replaced by ``expert_map[e]`` before the experts run, so a token
whose two chosen experts share a group gets that merged expert once per choice, each with its
own gate (see :func:`merge_routed_experts`).

Unfused experts hold exactly the fused weights, one ``nn.Linear`` per projection, so that
weight-only quantisers that act on ``nn.Linear`` (bitsandbytes, ...) can slim them.
"""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.dynamic_module_utils import get_class_from_dynamic_module
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

__all__ = ["CondensedMLP", "DroppedMLP", "UnfusedExperts", "CdmoeConfig", "CdmoeForCausalLM", "condensed_classes",
           "merge_routed_experts", "guard_cpu_packing"]

AUTO_MAP = {"AutoConfig": "modeling_cdmoe.CdmoeConfig", "AutoModelForCausalLM": "modeling_cdmoe.CdmoeForCausalLM"}


CPU_PACK_BLOCK_N = 32  # bitsandbytes' CPU repacking works on blocks of 32 output rows


def cpu_packing_supported(module: nn.Module) -> bool:
    """Whether bitsandbytes (0.49, 0.50) can repack a 4-bit ``Linear4bit`` for AVX512-BF16 CPUs, as it
    does on its first forward without gradients: ``in_features`` must be a multiple of the block size
    (64), ``out_features`` of 32, or it fails (``shape '[64, 0]' is invalid``). The demo model's 224 is not."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return state is None or (module.in_features % state.blocksize == 0 and module.out_features % CPU_PACK_BLOCK_N == 0)


def guard_cpu_packing(model: nn.Module) -> int:
    """Turn that repacking off where :func:`cpu_packing_supported` says it fails (those modules run
    bitsandbytes' generic 4-bit path); every load of a 4-bit condensed checkpoint applies it, with
    or without cdmoe. Returns how many modules were switched (none on CPUs without AVX512-BF16)."""
    switched = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False) and not cpu_packing_supported(module):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


class CondensedMLP(nn.Module):
    """A condensed MoE layer (Eq. 3) fused into one SwiGLU MLP.

    ``y = down_proj(act(gate_proj(x)) * up_proj(x) * m(x))`` where the intermediate units
    are laid out as ``[shared experts | routed expert 1 | ... | routed expert K]``, each
    routed expert's fixed gate is already folded into its ``down_proj`` columns, and
    ``m(x)`` is 1 except on the first ``gated_width`` units (a per-token shared-expert gate
    such as qwen2_moe's), where it is ``sigmoid(shared_gate(x))``.

    Shapes: x (..., hidden_size) -> (..., hidden_size); gate_proj/up_proj weights
    (intermediate_size, hidden_size); down_proj weight (hidden_size, intermediate_size).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, gated_width: int = 0,
                 bias: bool = False):
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gated_width = gated_width
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.shared_gate = nn.Linear(hidden_size, 1, bias=False) if gated_width else None
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)  # (..., intermediate_size)
        if self.shared_gate is not None:
            w = self.gated_width
            h = torch.cat([h[..., :w] * torch.sigmoid(self.shared_gate(x)), h[..., w:]], dim=-1)
        return self.down_proj(h)


class DroppedMLP(nn.Module):
    """An MoE sub-layer removed (Layer Drop): adds nothing to the residual stream."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class _ExpertMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)


class UnfusedExperts(nn.ModuleList):
    """Routed experts with one ``nn.Linear`` per projection; same call as the fused experts.

    ``forward(hidden_states (T, H), top_k_index (T, K), top_k_weights (T, K)) -> (T, H)``:
    sum over k of ``top_k_weights[t, k] * E_{top_k_index[t, k]}(x_t)`` with SwiGLU experts.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__([_ExpertMLP(hidden_size, intermediate_size) for _ in range(num_experts)])
        self.num_experts = num_experts
        self.hidden_act = hidden_act  # a string: an activation module would join the list

    @classmethod
    def from_fused(cls, fused: nn.Module, hidden_act: str) -> "UnfusedExperts":
        """The same experts as a fused module (``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I))."""
        e, two_i, h = fused.gate_up_proj.shape
        new = cls(e, h, two_i // 2, hidden_act).to(fused.gate_up_proj.dtype)
        with torch.no_grad():
            for i, expert in enumerate(new):
                expert.gate_proj.weight.copy_(fused.gate_up_proj[i, : two_i // 2])
                expert.up_proj.weight.copy_(fused.gate_up_proj[i, two_i // 2 :])
                expert.down_proj.weight.copy_(fused.down_proj[i])
        return new

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        act_fn = ACT2FN[self.hidden_act]
        for e in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == e)
            expert, x = self[e], hidden_states[token]
            y = expert.down_proj(act_fn(expert.gate_proj(x)) * expert.up_proj(x))
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def _shrink_experts(experts: nn.Module, num_experts: int, kept: int) -> None:
    """Keep the first ``kept`` of ``num_experts`` routed experts, in place: one module per expert
    (``nn.ModuleList``) or fused tensors whose first axis is the expert axis (E, ...)."""
    if isinstance(experts, nn.ModuleList):
        del experts[kept:]
        return
    for name, param in list(experts.named_parameters(recurse=False)):
        if param.dim() and param.shape[0] == num_experts:
            setattr(experts, name, nn.Parameter(param.data[:kept].clone(), requires_grad=param.requires_grad))
    if hasattr(experts, "num_experts"):
        experts.num_experts = kept


def _map_ids_hook(expert_map: torch.Tensor):
    """Router forward hook: the router's integer output (top-k ids (T, K) over E) mapped through
    ``expert_map`` (E,) to ids of the merged experts; every other output (logits, gates) unchanged."""

    def hook(module, args, output):
        items = list(output) if isinstance(output, tuple) else [output]
        ids = [i for i, t in enumerate(items) if isinstance(t, torch.Tensor) and not t.is_floating_point()]
        if len(ids) != 1:
            raise RuntimeError("cdmoe: merged experts need a router that returns one tensor of top-k expert ids")
        items[ids[0]] = expert_map.to(items[ids[0]].device)[items[ids[0]]]
        return tuple(items) if isinstance(output, tuple) else items[0]

    return hook


def merge_routed_experts(block: nn.Module, experts_attr: str, router_attr: str, expert_map) -> None:
    """Make ``block`` an M-SMoE merged layer, in place: its experts container keeps
    ``max(expert_map) + 1`` experts (their weights are loaded or copied in afterwards) and its
    router, unchanged, gets a forward hook mapping its top-k ids e -> ``expert_map[e]``.

    This is MC-SMoE's ``_merge_mlp_experts_by_usage_frequency_weighting`` binding every group
    member to one module, written without aliased modules: E'_l experts are stored once.
    ``expert_map``: (E,) ints in [0, E'_l), E = the router's rows.
    """
    expert_map = [int(e) for e in expert_map]
    kept = max(expert_map) + 1
    if sorted(set(expert_map)) != list(range(kept)):
        raise ValueError(f"cdmoe: expert_map {expert_map} must use every merged expert 0..{kept - 1}")
    _shrink_experts(getattr(block, experts_attr), len(expert_map), kept)
    lookup = torch.tensor(expert_map, dtype=torch.long, device="cpu")  # not on the meta device of a lazy init
    getattr(block, router_attr).register_forward_hook(_map_ids_hook(lookup))
    block.cdmoe_expert_map = tuple(expert_map)


def _apply_structure(model: nn.Module, config) -> None:
    """Swap in what ``config.cdmoe`` describes: condensed, dropped, merged and unfused layers, removed blocks."""
    spec = config.cdmoe
    layers = _resolve_attr(model, spec["layers_path"])
    for idx, entry in spec.get("merged_experts", {}).items():
        block = getattr(layers[int(idx)], spec["block_attr"])
        if max(entry["expert_map"]) + 1 != entry["num_experts"]:
            raise ValueError(f"cdmoe: layer {idx}'s merged_experts entry is inconsistent: {entry}")
        merge_routed_experts(block, spec.get("experts_attr", "experts"), spec.get("router_attr", "gate"),
                             entry["expert_map"])
    for idx, layer in spec.get("condensed_layers", {}).items():
        mlp = CondensedMLP(config.hidden_size, layer["intermediate_size"], config.hidden_act,
                           gated_width=layer.get("gated_width", 0), bias=layer.get("bias", False))
        setattr(layers[int(idx)], spec["block_attr"], mlp)
    for idx in spec.get("dropped_layers", []):
        setattr(layers[int(idx)], spec["block_attr"], DroppedMLP())
    for idx in spec.get("unfused_experts", []):
        block = getattr(layers[int(idx)], spec["block_attr"])
        fused = getattr(block, spec.get("experts_attr", "experts"))
        e, two_i, h = fused.gate_up_proj.shape
        setattr(block, spec.get("experts_attr", "experts"), UnfusedExperts(e, h, two_i // 2, config.hidden_act))
    remove_blocks(model, spec["layers_path"], spec.get("dropped_blocks", []))


def remove_blocks(model: nn.Module, layers_path: str, dropped) -> None:
    """Remove decoder layers ``dropped`` (original indices) from the stack (Block Drop)."""
    dropped = {int(i) for i in dropped}
    if not dropped:
        return
    layers = _resolve_attr(model, layers_path)
    kept = [layer for i, layer in enumerate(layers) if i not in dropped]
    for new_idx, layer in enumerate(kept):  # the KV cache is indexed by position in the stack
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    parent_path, _, name = layers_path.rpartition(".")
    setattr(_resolve_attr(model, parent_path) if parent_path else model, name, nn.ModuleList(kept))


class CdmoeConfig(PretrainedConfig):
    """Configuration of a condensed checkpoint: the base family's keys plus ``cdmoe``.

    Used only to read ``config.json``; the model is built with the family's own config
    class (see :func:`condensed_classes`).
    """

    model_type = "cdmoe"


def _resolve_attr(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def _is_native(cls: type) -> bool:
    return cls.__module__.startswith("transformers.")


_CLASS_CACHE: dict[tuple[type, type, bool], tuple[type, type]] = {}


def condensed_classes(base_config_cls: type, base_model_cls: type, family_keys: bool = False) -> tuple[type, type]:
    """Config and model classes of a condensed checkpoint of one family.

    The config class is the family's config class with ``model_type = "cdmoe"`` (so a
    saved ``config.json`` never passes for the original family); the model class is the
    family's ``*ForCausalLM`` whose ``__init__`` swaps the condensed blocks in before
    weights load, so weight names stay the family's own. ``family_keys`` (``cdmoe.checkpoint_keys:
    family``, FP8 outputs): the checkpoint has the family's on-disk keys (one tensor per expert), which
    load through the family's key conversions, as the original's do.
    """
    key = (base_config_cls, base_model_cls, family_keys)
    if key in _CLASS_CACHE:
        return _CLASS_CACHE[key]

    def __init__(self, config, *args, **kwargs):
        base_model_cls.__init__(self, config, *args, **kwargs)
        _apply_structure(self, config)

    def save_pretrained(self, save_directory, *args, **kwargs):
        self.config.auto_map = dict(AUTO_MAP)
        self.config.architectures = ["CdmoeForCausalLM"]
        # keep transformers' in-memory (fused) expert layout on disk: a remote-code load applies no
        # key conversions, so the original per-expert layout would not load back
        kwargs.setdefault("save_original_format", False)
        base_model_cls.save_pretrained(self, save_directory, *args, **kwargs)
        out = Path(save_directory)
        shutil.copyfile(__file__, out / "modeling_cdmoe.py")
        for cls in (base_config_cls, base_model_cls):  # remote-code families ship their code along
            if not _is_native(cls):
                shutil.copyfile(inspect.getfile(cls), out / Path(inspect.getfile(cls)).name)

    # _auto_class None: transformers must not rewrite auto_map from these (generated) classes
    cfg_cls = type(f"Cdmoe{base_config_cls.__name__}", (base_config_cls,), {"model_type": "cdmoe", "_auto_class": None})
    model_cls = type(f"Condensed{base_model_cls.__name__}{'FamilyKeys' if family_keys else ''}", (base_model_cls,),
                     {"config_class": cfg_cls, "__init__": __init__, "save_pretrained": save_pretrained, "_auto_class": None})
    mapping = get_checkpoint_conversion_mapping(base_config_cls.model_type) if family_keys else None
    if mapping:
        register_checkpoint_conversion_mapping(model_cls.__name__, mapping, overwrite=True)
    _CLASS_CACHE[key] = (cfg_cls, model_cls)
    return cfg_cls, model_cls


_TRUSTED_CODE: set[str] = set()  # directories whose family code this process was allowed to run


def _family_classes(config: PretrainedConfig, trust_remote_code: bool | None = None) -> tuple[type, type]:
    """The family's config and CausalLM classes: transformers' own, or (remote-code families such as
    DeepSeekMoE-16B) the family code shipped in the directory, which runs only if trusted: this file
    itself loaded through the directory's ``auto_map`` (the user passed ``trust_remote_code=True``),
    or ``trust_remote_code=True`` given to ``from_pretrained`` here."""
    spec = config.cdmoe
    base_type = spec["base_model_type"]
    if base_type in CONFIG_MAPPING and CONFIG_MAPPING[base_type] in MODEL_FOR_CAUSAL_LM_MAPPING:
        cfg_cls = CONFIG_MAPPING[base_type]
        return cfg_cls, MODEL_FOR_CAUSAL_LM_MAPPING[cfg_cls]
    auto_map = spec.get("base_auto_map") or {}
    if "AutoConfig" not in auto_map or "AutoModelForCausalLM" not in auto_map:
        raise ValueError(f"cdmoe: base model type {base_type!r} is unknown to this transformers and has no code")
    where = config._name_or_path
    loaded_as_remote_code = not __name__.startswith("cdmoe.")  # this file ran from the directory: already trusted
    if trust_remote_code or loaded_as_remote_code:
        _TRUSTED_CODE.add(str(where))
    if str(where) not in _TRUSTED_CODE:
        raise ValueError(
            f"{where} is a condensed {base_type!r} model whose modelling code ships in the directory "
            f"({auto_map['AutoModelForCausalLM']}); loading it runs that code: pass trust_remote_code=True "
            "if you trust it")
    return (
        get_class_from_dynamic_module(auto_map["AutoConfig"], where),
        get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], where),
    )


def to_family_config(config: PretrainedConfig, trust_remote_code: bool | None = None) -> PretrainedConfig:
    """The condensed config as an instance of the family's (subclassed) config class."""
    if hasattr(config, "cdmoe") and not isinstance(config, CdmoeConfig):
        return config
    cfg_cls, _ = condensed_classes(*_family_classes(config, trust_remote_code))
    data = config.to_dict()
    data.pop("model_type", None)
    family_config = cfg_cls.from_dict(data)
    family_config._name_or_path = config._name_or_path
    return family_config


class CdmoeForCausalLM(PreTrainedModel):
    """Auto-API entry point: dispatches to the condensed subclass of the family's model."""

    config_class = CdmoeConfig

    def __init__(self, config, *args, **kwargs):  # pragma: no cover - never built directly
        raise TypeError("build condensed models with from_pretrained() or from_config()")

    @classmethod
    def _model_class(cls, config: PretrainedConfig, trust_remote_code: bool | None = None):
        family_config = to_family_config(config, trust_remote_code)
        family_keys = family_config.cdmoe.get("checkpoint_keys") == "family"
        _, model_cls = condensed_classes(*_family_classes(family_config, trust_remote_code), family_keys)
        return family_config, model_cls

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        trust = kwargs.pop("trust_remote_code", None)  # the Auto class passes the user's (resolved) decision
        if not isinstance(config, PretrainedConfig):
            config = CdmoeConfig.from_pretrained(config or pretrained_model_name_or_path)
        family_config, model_cls = cls._model_class(config, trust)
        model = model_cls.from_pretrained(pretrained_model_name_or_path, *model_args, config=family_config, **kwargs)
        if getattr(model, "is_quantized", False):
            guard_cpu_packing(model[0] if isinstance(model, tuple) else model)  # (output_loading_info=True: a tuple)
        return model

    @classmethod
    def _from_config(cls, config, **kwargs):
        family_config, model_cls = cls._model_class(config, kwargs.pop("trust_remote_code", None))
        return model_cls._from_config(family_config, **kwargs)

    @classmethod
    def from_config(cls, config, **kwargs):
        return cls._from_config(config, **kwargs)
