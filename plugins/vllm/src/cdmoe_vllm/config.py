"""Config resolution of ``model_type: "cdmoe"`` in vLLM's environment.

A condensed ``config.json`` is the family's config plus a ``cdmoe`` entry (format: cdmoe's
``modeling_cdmoe.py``). :class:`CdmoeConfig` is registered with ``AutoConfig`` for
``cdmoe``; ``from_dict`` returns an instance of the family's own transformers config
class, so every vLLM check keyed on ``model_type`` (MLA, rotary, ...) sees the family.
The returned config describes the stack vLLM builds:

* ``architectures`` names this plugin's model class for the family;
* Block Drop: ``num_hidden_layers`` counts the kept decoder layers and every per-layer
  key (lists of length L, the family's dense-layer rule) is rewritten for the kept
  stack; ``cdmoe["kept_layers"]`` maps vLLM's layer index to the original index;
* ``cdmoe`` keeps the spec (``condensed_layers``, ``dropped_layers``, ``pruned_experts`` use original
  indices; a pruned layer is the family's MoE block built with its own expert count);
* DeepseekV2's greedy routing gets the group keys vLLM needs (:func:`greedy_routing_overrides`);
* ``quantization_config`` (compressed-tensors, :mod:`cdmoe_vllm.quant`) stays: vLLM reads it.

This runs in vLLM's front-end process, before any engine process starts, so everything that
can be refused from the config and the file headers is refused here, in one line
(:class:`CdmoeVllmError`): a malformed entry (:mod:`cdmoe_vllm.spec`), what the plugin cannot
serve exactly (on this machine: :mod:`cdmoe_vllm.quant`), and, for a local directory, incomplete weight files (:mod:`cdmoe_vllm.files`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .errors import SUPPORTED_FAMILIES, CdmoeVllmError, malformed, unsupported
from .files import check_files
from .quant import check_quantisation
from .spec import check_spec

__all__ = ["ARCHITECTURES", "SUPPORTED_FAMILIES", "CdmoeConfig", "CdmoeVllmError", "family_config",
           "greedy_routing_overrides", "original_overrides", "register_config"]

# base model type -> this plugin's vLLM model class (models.py)
ARCHITECTURES = {
    "deepseek_v2": "CdmoeDeepseekV2ForCausalLM",
    "deepseek_v3": "CdmoeDeepseekV3ForCausalLM",
    "qwen2_moe": "CdmoeQwen2MoeForCausalLM",
    "qwen3_moe": "CdmoeQwen3MoeForCausalLM",
    "mixtral": "CdmoeMixtralForCausalLM",
    "olmoe": "CdmoeOlmoeForCausalLM",
    "glm4_moe": "CdmoeGlm4MoeForCausalLM",
}
assert tuple(ARCHITECTURES) == SUPPORTED_FAMILIES
# how each family's vLLM class decides dense vs MoE per layer, from global config keys
FIRST_K_DENSE, SPARSE_STEP, ALL_MOE = "first_k_dense_replace", "decoder_sparse_step", "all"
DENSE_RULES = {"deepseek_v2": FIRST_K_DENSE, "deepseek_v3": FIRST_K_DENSE, "glm4_moe": FIRST_K_DENSE,
               "qwen2_moe": SPARSE_STEP, "qwen3_moe": SPARSE_STEP, "mixtral": ALL_MOE, "olmoe": ALL_MOE}


def _dense_pattern(base: str, data: dict, num_layers: int) -> list[bool]:
    """Which original layers are dense MLP layers by the family's own rule (length L)."""
    rule = DENSE_RULES[base]
    if rule == FIRST_K_DENSE:  # (glm4_moe has no moe_layer_freq: 1)
        k, freq = data.get("first_k_dense_replace", 0), data.get("moe_layer_freq", 1)
        return [i < k or i % freq != 0 for i in range(num_layers)]
    if rule == SPARSE_STEP:
        only, step = set(data.get("mlp_only_layers") or []), data.get("decoder_sparse_step", 1)
        return [i in only or (i + 1) % step != 0 for i in range(num_layers)]
    return [False] * num_layers  # mixtral, olmoe: every layer is MoE


def _drop_blocks(base: str, data: dict, dropped: set[int], where: str | None) -> list[int]:
    """Rewrite ``data`` (in place) for the stack without blocks ``dropped``; returns kept indices."""
    num_layers = data["num_hidden_layers"]
    kept = [i for i in range(num_layers) if i not in dropped]
    dense = [_dense_pattern(base, data, num_layers)[i] for i in kept]
    for key, value in list(data.items()):  # per-layer lists (layer_types, ...)
        if isinstance(value, list) and len(value) == num_layers and key != "architectures":
            data[key] = [value[i] for i in kept]
    data["num_hidden_layers"] = len(kept)
    if DENSE_RULES[base] == FIRST_K_DENSE:
        k = sum(dense)
        if dense != [j < k for j in range(len(kept))]:
            raise unsupported("Block Drop left dense layers that vLLM's first-k-dense rule cannot express", where)
        data["first_k_dense_replace"] = k
        if "moe_layer_freq" in data:
            data["moe_layer_freq"] = 1
    elif DENSE_RULES[base] == SPARSE_STEP:
        data["mlp_only_layers"] = [j for j, is_dense in enumerate(dense) if is_dense]
        data["decoder_sparse_step"] = 1
        if data.get("use_sliding_window"):
            raise unsupported("Block Drop with sliding-window attention is not supported", where)
    return kept


def _check_layers(base: str, data: dict, spec: dict, where: str | None) -> None:
    """Condensed and dropped layers must be MoE layers by the family's rule: vLLM builds the
    family's dense MLP (its global width) at the others and never asks for the entry's block."""
    dense = _dense_pattern(base, data, data["num_hidden_layers"])
    for key in (*spec.get("condensed_layers", {}), *spec.get("dropped_layers", []), *spec.get("pruned_experts", {})):
        if dense[int(key)]:
            raise malformed(f"layer {key} is a dense layer of {base} (by {DENSE_RULES[base]}), not an MoE layer, "
                            "and only MoE layers are condensed, pruned or dropped", where)


def _layer_kinds(base: str, data: dict, spec: dict, kept: list[int]) -> list[str]:
    """What each layer of the kept stack (``data`` rewritten for it) holds as its block."""
    dense = _dense_pattern(base, data, len(kept))
    condensed, dropped = {int(k) for k in spec.get("condensed_layers", {})}, set(spec.get("dropped_layers", []))
    return ["condensed" if o in condensed else "dropped" if o in dropped else "dense" if dense[j] else "moe"
            for j, o in enumerate(kept)]


def greedy_routing_overrides(model_type: str, data: dict) -> dict:
    """Config keys that make vLLM 0.32 route a DeepseekV2 model as transformers does, or ``{}``.

    With ``topk_method: "greedy"`` (transformers' default; DeepSeek-V2-Lite) the router takes the
    top-k over all experts and ignores ``n_group``/``topk_group``. vLLM always runs grouped top-k
    with ``getattr(config, "n_group", 1)``, which is None in a config written with transformers'
    defaults: its CPU router asserts (``CPURouter._compute_routing``), its GPU router factory
    raises. One group, one group kept, is the same top-k over all experts, so
    ``{"n_group": 1, "topk_group": 1}`` changes nothing transformers computes. Condensed
    configs get them here; for an original checkpoint pass them to vLLM as ``hf_overrides``."""
    if model_type != "deepseek_v2" or data.get("topk_method", "greedy") != "greedy":
        return {}
    exact = {"n_group": 1, "topk_group": 1}
    return {} if all(data.get(k) == v for k, v in exact.items()) else exact


def original_overrides(model_dir: Path) -> dict:
    """``hf_overrides`` for vLLM to serve the checkpoint in ``model_dir`` as transformers computes it
    (:func:`greedy_routing_overrides`), or ``{}``; a condensed directory needs none (its config
    resolution applies them)."""
    data = json.loads((Path(model_dir) / "config.json").read_text())
    return greedy_routing_overrides(data.get("model_type"), data)


def _on_cpu() -> bool:
    """Whether vLLM runs on its CPU platform (without vLLM, as in cdmoe's own tests: whether torch sees no GPU)."""
    try:
        from .engine import on_cpu

        return on_cpu()
    except ImportError:
        import torch

        return not torch.cuda.is_available()


def family_config(config_dict: dict, **kwargs):
    """The family config (transformers class of ``base_model_type``) vLLM should build.
    ``kwargs["name_or_path"]`` (set by ``AutoConfig.from_pretrained``) is the model vLLM was given:
    the weight files of a local directory are checked; a hub id's are fetched later by vLLM."""
    where = kwargs.get("name_or_path") or None
    spec = check_spec(config_dict, where)
    base = spec["base_model_type"]
    if base not in ARCHITECTURES:
        raise unsupported(f"condensed {base!r} models are not supported", where)
    quantisation = config_dict.get("quantization_config")
    if quantisation:
        check_quantisation(quantisation, where, _on_cpu())
    if spec.get("merged_experts"):
        raise unsupported("M-SMoE outputs (experts merged behind the full router) are not supported", where)
    if any(layer.get("bias") for layer in spec.get("condensed_layers", {}).values()):
        raise unsupported("condensed layers with biases are not supported", where)
    _check_layers(base, config_dict, spec, where)
    data = copy.deepcopy(config_dict)
    for key in ("auto_map", "model_type", "transformers_version"):
        data.pop(key, None)
    spec = data["cdmoe"]
    spec["kept_layers"] = _drop_blocks(base, data, {int(i) for i in spec.get("dropped_blocks", [])}, where)
    if where and Path(where).is_dir():
        check_files(Path(where), data, spec, spec["kept_layers"], _layer_kinds(base, data, spec, spec["kept_layers"]))
    data.update(greedy_routing_overrides(base, data))
    data["architectures"] = [ARCHITECTURES[base]]
    return CONFIG_MAPPING[base].from_dict(data, **kwargs)


class CdmoeConfig(PretrainedConfig):
    """``AutoConfig`` entry for ``cdmoe``: reading a config returns the family's config."""

    model_type = "cdmoe"

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        return family_config(config_dict, **kwargs)


def register_config() -> None:
    """Register :class:`CdmoeConfig` with transformers (idempotent)."""
    AutoConfig.register("cdmoe", CdmoeConfig, exist_ok=True)
