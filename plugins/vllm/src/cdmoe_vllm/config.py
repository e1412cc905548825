"""Config resolution of ``model_type: "cdmoe"`` in vLLM's environment.

A condensed ``config.json`` is the family's config plus a ``cdmoe`` entry (format:
cdmoe's ``modeling_cdmoe.py``). :class:`CdmoeConfig` is registered with ``AutoConfig`` for
``cdmoe``; ``from_dict`` returns an instance of the family's own transformers config
class, so every vLLM check keyed on ``model_type`` (MLA, rotary, ...) sees the family.
The returned config describes the stack vLLM builds:

* ``architectures`` names this plugin's model class for the family;
* Block Drop: ``num_hidden_layers`` counts the kept decoder layers and every per-layer
  key (lists of length L, the family's dense-layer rule) is rewritten for the kept
  stack; ``cdmoe["kept_layers"]`` maps vLLM's layer index to the original index;
* ``cdmoe`` keeps the spec (``condensed_layers``, ``dropped_layers`` use original indices).

Anything the plugin cannot serve exactly is refused with one line (:class:`CdmoeVllmError`).
"""

from __future__ import annotations

import copy

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

__all__ = ["ARCHITECTURES", "SUPPORTED_FAMILIES", "CdmoeConfig", "CdmoeVllmError", "family_config", "register_config"]

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
# how each family's vLLM class decides dense vs MoE per layer, from global config keys
FIRST_K_DENSE, SPARSE_STEP, ALL_MOE = "first_k_dense_replace", "decoder_sparse_step", "all"
DENSE_RULES = {"deepseek_v2": FIRST_K_DENSE, "deepseek_v3": FIRST_K_DENSE, "glm4_moe": FIRST_K_DENSE,
               "qwen2_moe": SPARSE_STEP, "qwen3_moe": SPARSE_STEP, "mixtral": ALL_MOE, "olmoe": ALL_MOE}
SUPPORTED_FAMILIES = tuple(ARCHITECTURES)
FORMAT_VERSION = 1


class CdmoeVllmError(ValueError):
    """A condensed checkpoint this plugin cannot serve (the message is one line)."""


def _refuse(what: str) -> CdmoeVllmError:
    return CdmoeVllmError(
        f"cdmoe-vllm: {what}; vLLM serves unquantised condensed checkpoints of the families "
        f"{', '.join(SUPPORTED_FAMILIES)}")


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


def _drop_blocks(base: str, data: dict, dropped: set[int]) -> list[int]:
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
            raise _refuse("Block Drop left dense layers that vLLM's first-k-dense rule cannot express")
        data["first_k_dense_replace"] = k
        if "moe_layer_freq" in data:
            data["moe_layer_freq"] = 1
    elif DENSE_RULES[base] == SPARSE_STEP:
        data["mlp_only_layers"] = [j for j, is_dense in enumerate(dense) if is_dense]
        data["decoder_sparse_step"] = 1
        if data.get("use_sliding_window"):
            raise _refuse("Block Drop with sliding-window attention is not supported")
    return kept


def family_config(config_dict: dict, **kwargs):
    """The family config (transformers class of ``base_model_type``) vLLM should build."""
    spec = config_dict.get("cdmoe")
    if not isinstance(spec, dict):
        raise _refuse("config.json has model_type 'cdmoe' but no 'cdmoe' entry")
    base = spec.get("base_model_type")
    if spec.get("format_version") != FORMAT_VERSION:
        raise _refuse(f"cdmoe format_version {spec.get('format_version')!r} is not {FORMAT_VERSION}")
    if base not in ARCHITECTURES:
        raise _refuse(f"condensed {base!r} models are not supported")
    if config_dict.get("quantization_config"):
        method = config_dict["quantization_config"].get("quant_method", "?")
        raise _refuse(f"quantised ({method}) condensed checkpoints are not supported")
    for key, what in (("merged_experts", "M-SMoE outputs (experts merged behind the full router)"),
                      ("unfused_experts", "outputs with unfused (one module per expert) MoE layers")):
        if spec.get(key):
            raise _refuse(f"{what} are not supported")
    if any(layer.get("bias") for layer in spec.get("condensed_layers", {}).values()):
        raise _refuse("condensed layers with biases are not supported")
    data = copy.deepcopy(config_dict)
    for key in ("auto_map", "model_type", "transformers_version"):
        data.pop(key, None)
    spec = data["cdmoe"]
    spec["kept_layers"] = _drop_blocks(base, data, {int(i) for i in spec.get("dropped_blocks", [])})
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
