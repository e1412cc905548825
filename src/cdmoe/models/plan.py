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

__all__ = ["load_config", "meta_model", "params_from_config", "plan", "DTYPE_BYTES"]

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
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h + (heads * hd + 2 * kv * hd if bias else 0)
    norms = 2 * h
    dense_mlp = 3 * h * data["intermediate_size"]
    n_exp = next(data[k] for k in spec.num_experts_keys if data.get(k))
    inter = data[spec.expert_intermediate_key]
    shared_inter = data.get("shared_expert_intermediate_size") or inter * (data.get("n_shared_experts") or 0)
    first_dense = data.get("first_k_dense_replace", 0) or 0
    freq = data.get("moe_layer_freq", 1) or 1
    total = v * h * (1 if data.get("tie_word_embeddings", True) else 2) + h
    non_layer, largest = total, 0
    layers = []
    for i in range(n_layers):
        before = total
        total += attn + norms
        if i >= first_dense and i % freq == 0:
            layer = MoELayerParams(
                layer=i, num_experts=n_exp, top_k=data[spec.top_k_key], expert=3 * h * inter,
                expert_intermediate=inter, shared=3 * h * shared_inter, other=n_exp * h,
            )
            layers.append(layer)
            total += layer.total
        else:
            total += dense_mlp
        largest = max(largest, total - before)
    return ModelParams(total=total, layers=tuple(layers), largest_layer=largest, non_layer=non_layer,
                       num_layers=n_layers, hidden_size=h)


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


def plan(
    model_or_config: str | Path,
    layers: int | None = None,
    experts: int | None = None,
    layer_ids: list[int] | None = None,
    dtype: str | None = None,
    calib_tokens: int = 100 * 512,
) -> dict:
    """Memory of condensing ``layers`` MoE layers (or ``layer_ids``) to ``experts`` routed experts each.

    ``experts=None`` keeps top-k routed experts per layer; ``experts=0`` is CD-MoE-S. Also the
    sequential-mode memory (:meth:`~cdmoe.models.budget.ModelParams.sequential`) for ``calib_tokens``
    calibration tokens, with activations cached in ``dtype`` (what a GPU computes in).
    """
    config = load_config(model_or_config)
    params, counted = params_from_config(config)
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
    result.update(params.sequential(DTYPE_BYTES.get(dtype, 2), calib_tokens, DTYPE_BYTES.get(dtype, 2)))
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


