"""``cdmoe plan``: memory of a condensing plan from the config alone (no weights).

The model is built on the meta device with the family's own class, so every tensor is
counted exactly as the checkpoint stores it. For a remote-code family whose code is not
at hand (e.g. DeepSeekMoE-16B's config.json alone), the count is analytic: LLaMA-style
attention (q/k/v/o, optional q/k/v bias), two RMSNorms per layer, SwiGLU MLPs, and the
MoE layer rule from ``first_k_dense_replace`` / ``moe_layer_freq``; ``counted`` in the
output says which way was used.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..errors import CdmoeError
from ..io.remote_code import remote_code_error, trusted
from .budget import ModelParams, MoELayerParams, model_params
from .families import spec_for_model_type, supported_model_types
from .input_checks import check_family_keys, read_config, read_json_object
from .loading import resolve_dtype

__all__ = ["config_dtype", "count", "declares_block_fp8", "storage_bytes", "load_config", "meta_model",
           "params_from_config", "plan", "DTYPE_BYTES"]

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "float8_e4m3fn": 1}


def load_config(model_or_config: str | Path) -> PretrainedConfig | dict:
    """A config object from a config.json, a model directory or a hub id.

    Returns the raw dict for a remote-code family whose code is not available locally.
    """
    path = Path(model_or_config)
    if path.suffix == ".json" or path.is_dir():
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise CdmoeError(f"{file} does not exist; pass a config.json, a model directory or a hub model id")
        data = read_config(file.parent) if file.name == "config.json" else read_json_object(file, "pass a model's config.json")
        check_family_keys(data, file)
        model_type = data.get("model_type")
        if model_type in CONFIG_MAPPING:
            data = {k: v for k, v in data.items() if k not in ("model_type", "auto_map")}
            return CONFIG_MAPPING[model_type].from_dict(data)
        if path.is_dir() and "auto_map" in data and trusted():  # else counted from the config dict alone
            return AutoConfig.from_pretrained(path, trust_remote_code=True)
        return data
    if str(model_or_config).startswith((".", "/")) or path.exists():
        raise CdmoeError(f"{model_or_config} does not exist; pass a config.json, a model directory or a hub model id")
    try:
        return AutoConfig.from_pretrained(str(model_or_config), trust_remote_code=trusted())
    except ValueError as err:
        raise remote_code_error(model_or_config, err) or CdmoeError(
            f"cannot load a config for {model_or_config!r}: {str(err).splitlines()[0]}") from None
    except OSError as err:
        raise CdmoeError(
            f"cannot load a config for {model_or_config!r} ({str(err).splitlines()[0]}); "
            "if the hub is unreachable, pass the path of a local config.json"
        ) from None


def _analytic(data: dict) -> ModelParams:
    """Count a LLaMA-style MoE from its config dict (remote-code families without code)."""
    spec = spec_for_model_type(data.get("model_type", ""))
    if spec is None:
        raise CdmoeError(
            f"unsupported model family {data.get('model_type')!r}; supported: {', '.join(supported_model_types())}"
        )
    h, v, n_layers = data["hidden_size"], data["vocab_size"], data["num_hidden_layers"]
    heads = data["num_attention_heads"]
    kv = data.get("num_key_value_heads") or heads
    hd = data.get("head_dim") or h // heads
    bias = bool(data.get("attention_bias", False))
    attn_tensors = [h * heads * hd, h * kv * hd, h * kv * hd, heads * hd * h] + ([heads * hd, kv * hd, kv * hd] if bias else [])
    attn = sum(attn_tensors)
    norms = 2 * h
    dense_mlp = 3 * h * data["intermediate_size"]
    n_exp = next(data[k] for k in spec.num_experts_keys if data.get(k))
    inter = data[spec.expert_intermediate_key]
    shared_inter = data.get("shared_expert_intermediate_size") or inter * (data.get("n_shared_experts") or 0)
    first_dense = data.get("first_k_dense_replace", 0) or 0
    freq = data.get("moe_layer_freq", 1) or 1
    tied = data.get("tie_word_embeddings", True)
    total = v * h * (1 if tied else 2) + h
    non_layer, largest = total, 0
    layers, kinds = [], {}
    for i in range(n_layers):
        before = total
        total += attn + norms
        tensors = attn_tensors + [h, h]
        if i >= first_dense and i % freq == 0:
            layer = MoELayerParams(
                layer=i, num_experts=n_exp, top_k=data[spec.top_k_key], expert=3 * h * inter,
                expert_intermediate=inter, shared=3 * h * shared_inter, other=n_exp * h,
            )
            layers.append(layer)
            total += layer.total
            tensors += [h * inter] * (3 * n_exp) + [h * shared_inter] * (3 if shared_inter else 0) + [n_exp * h]
        else:
            total += dense_mlp
            tensors += [h * data["intermediate_size"]] * 3
        kinds[tuple(sorted(tensors, reverse=True))] = None
        largest = max(largest, total - before)
    return ModelParams(total=total, layers=tuple(layers), largest_layer=largest, non_layer=non_layer,
                       num_layers=n_layers, hidden_size=h, vocab_size=v, attention_heads=heads,
                       layer_tensors=tuple(kinds), non_layer_tensors=tuple([v * h] * (1 if tied else 2) + [h]),
                       largest_source=max(attn_tensors + [h * inter, h * shared_inter, h * data["intermediate_size"]]))


def meta_model(config: PretrainedConfig):
    """The family's model of ``config`` on the meta device (no memory, every tensor's shape and dtype)."""
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trusted())
        except ValueError as err:
            raise CdmoeError(f"cannot build {config.model_type!r}: {str(err).splitlines()[0]}") from None


def params_from_config(config: PretrainedConfig | dict) -> tuple[ModelParams, str]:
    """Parameter breakdown and how it was counted ("meta-device model" or "analytic")."""
    if isinstance(config, dict):
        return _analytic(config), "analytic (LLaMA-style attention; no modelling code at hand)"
    return model_params(meta_model(config)), "meta-device model"


def config_dtype(config: PretrainedConfig | dict) -> torch.dtype | None:
    """The dtype a config says its checkpoint stores (``dtype`` / ``torch_dtype``), None if it says none."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    name = str(get("dtype", None) or get("torch_dtype", None) or "").replace("torch.", "")
    found = getattr(torch, name, None) if name else None
    return found if isinstance(found, torch.dtype) else None


def storage_bytes(model_or_config: str | Path, config: PretrainedConfig | dict, params: ModelParams) -> float:
    """Bytes per parameter the checkpoint stores: of a local directory, its safetensors files' size over
    the parameter count (mixed dtypes, an FP8 release's 1-byte weights and their scales included);
    from a config alone, its dtype's size, 1 byte for the decoder layers of a declared block-FP8 one."""
    files = list(Path(str(model_or_config)).glob("*.safetensors")) if Path(str(model_or_config)).is_dir() else []
    if files:
        return sum(f.stat().st_size for f in files) / params.total
    dtype = config_dtype(config) or torch.bfloat16
    if declares_block_fp8(config):
        return (params.non_layer * dtype.itemsize + params.total - params.non_layer) / params.total
    return dtype.itemsize


def declares_block_fp8(config: PretrainedConfig | dict) -> bool:
    """Whether the config declares block-FP8 weights (read as their bf16 cast, :mod:`cdmoe.models.fp8_blocks`)."""
    from .fp8_blocks import declares_fp8, quantization_entry

    return declares_fp8(quantization_entry(config if isinstance(config, dict) else config.to_dict()))


def count(model_or_config: str | Path) -> tuple[PretrainedConfig | dict, ModelParams, str]:
    """(config, parameter breakdown, how it was counted) of a config.json, model directory or hub id."""
    config = load_config(model_or_config)
    params, how = params_from_config(config)
    if not params.layers:
        raise CdmoeError("this model has no sparse MoE layer (a dense model?); nothing to condense")
    return config, params, how


def plan(
    model_or_config: str | Path,
    layers: int | None = None,
    experts: int | None = None,
    layer_ids: list[int] | None = None,
    dtype: str | None = None,
    known: tuple[PretrainedConfig | dict, ModelParams, str] | None = None,
) -> dict:
    """Parameters and bytes of condensing ``layers`` MoE layers (or ``layer_ids``) to ``experts`` routed
    experts each, in ``dtype`` (default: the config's). ``experts=None`` keeps top-k routed experts per
    layer; ``experts=0`` is CD-MoE-S. ``known``: :func:`count` of the model, if the caller has it.
    What a run needs in memory is :mod:`cdmoe.memory.estimate`'s."""
    config, params, counted = known or count(model_or_config)
    if not params.layers:
        raise CdmoeError("this model has no sparse MoE layer (a dense model?); nothing to condense")
    moe_ids = params.moe_layer_ids
    if layer_ids is None:
        n = len(moe_ids) if layers is None else layers
        if not 1 <= n <= len(moe_ids):
            raise CdmoeError(f"--layers {n} is out of range: the model has {len(moe_ids)} MoE layers (1..{len(moe_ids)})")
        layer_ids = moe_ids[len(moe_ids) - n :]
    bad = [i for i in layer_ids if i not in moe_ids]
    if bad:
        raise CdmoeError(f"layers {bad} are not MoE layers; MoE layers are {moe_ids[0]}..{moe_ids[-1]} ({len(moe_ids)})")
    per_layer = {}
    for layer in params.layers:
        if layer.layer in layer_ids:
            k = layer.top_k if experts is None else experts
            if not 0 <= k <= layer.num_experts:
                raise CdmoeError(f"--experts {k} is out of range: layer {layer.layer} has {layer.num_experts} routed experts")
            per_layer[layer.layer] = k
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    if dtype not in (None, "auto"):
        resolved = resolve_dtype(dtype)  # a one-line error for an unknown name
        dtype = str(resolved).replace("torch.", "")
    else:
        dtype = str(get("dtype", None) or get("torch_dtype", None) or "bfloat16").replace("torch.", "")
    result = params.summary(per_layer, DTYPE_BYTES.get(dtype, 2))
    first = params.layers[0]
    result.update(
        model=str(model_or_config),
        model_type=get("model_type"),
        counted=counted,
        dtype=dtype,
        experts_kept=sorted(set(per_layer.values())),
        routed_experts=first.num_experts,
        top_k=first.top_k,
        shared_params_per_layer=first.shared,
        expert_params=first.expert,
    )
    return result


