"""Quantised outputs in compressed-tensors format: vLLM's own format, what llm-compressor writes.

Three calibration-free schemes (compressed-tensors' presets; round-to-nearest weights):

- ``w8a8`` (preset ``W8A8``, format ``int-quantized``): int8 weights with one scale per output
  row, s_r = max_c |W_rc| / 127.5 (half of compressed-tensors' symmetric range [-128, 127]),
  q = clamp(round(W / s), -128, 127); activations int8 with one scale per token,
  computed at run time (dynamic). vLLM runs it on GPUs and on its CPU backend, MoE layers included.
- ``w4a16`` (``W4A16``, ``pack-quantized``): int4 weights, one scale per row and group of G input
  columns, s = max |W| / 7.5 over the group (compressed-tensors' symmetric range [-8, 7]), eight
  codes packed per int32; activations unquantised. G = 128, or the largest of 64 and 32 that divides
  every quantised layer's input width (the demo model: 32). vLLM runs it on GPUs.
- ``fp8`` (``FP8_BLOCK``, ``float-quantized``): float8_e4m3 weights with one scale per 128 x 128
  block, s = max |W| / 448 over the block (edge blocks partial), activations float8 with a dynamic
  scale per token and group of 128 input columns, as DeepSeek-V3 ships. vLLM runs it on Hopper and
  later GPUs. Every quantised layer's input width must be a multiple of 128 (the activation groups).

What is quantised: every ``nn.Linear`` of the decoder layers (attention, dense MLPs, shared experts,
condensed MLPs of Eq. 3, and routed experts, re-expressed as one ``nn.Linear`` per projection and
expert first; :class:`~cdmoe.models.modeling_cdmoe.UnfusedExperts`, same weights). Attention is
included because llm-compressor's recipes quantise it and, on models whose attention and embeddings
are a large share of the bytes (the demo model), quantising only the feed-forward weights leaves
two thirds of the bytes. Kept as the source stores them, byte for byte: embeddings, norms, routers,
per-token shared-expert gates and the LM head (:data:`KEEP`).

On disk (compressed-tensors' names, what vLLM's loaders read): ``{module}.weight`` (int8 / float8)
or ``{module}.weight_packed`` (int32) + ``weight_shape``, and ``{module}.weight_scale`` ((O, 1),
(O, I / G), or (ceil(O/128), ceil(I/128)) for blocks; dequantised W = q * s, which DeepSeek's own
FP8 checkpoints call ``weight_scale_inv``), in fp32 (as DeepSeek's): in bf16, q * s would not be
exact (compressed-tensors dequantises in the scale's dtype), at a cost of 2 bytes per scale. Routed experts are
stored one tensor per expert (``experts.{e}.gate_proj.weight``, the hub's layout). The output keeps
the family's own format when transformers loads such experts into its fused experts (w4a16 and fp8,
which transformers 5.24 dequantises on load, for families whose hub names these are); otherwise
(w8a8: transformers 5.24 has no int8 expert path) it is cdmoe format with ``unfused_experts``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CdmoeError
from ..models.adapter import family_spec, moe_blocks
from ..models.compressed_bytes import KEEP_PATTERNS, input_widths, is_quantised, w4a16_group
from ..models.condensed import to_cdmoe_format
from ..models.modeling_cdmoe import UnfusedExperts

__all__ = ["KEEP", "SCHEMES", "check_scheme", "compress_modules", "compress_prepared", "compressed_record",
           "config_entry", "freeze_scales", "prepare_quantized", "quantize_compressed", "quantized_modules", "record_entry",
           "scheme_for", "unfuse_for"]

SCHEMES = {"w8a8": "W8A8", "w4a16": "W4A16", "fp8": "FP8_BLOCK"}
FORMATS = {"w8a8": "int-quantized", "w4a16": "pack-quantized", "fp8": "float-quantized"}
KEEP = KEEP_PATTERNS  # kept as the source has them (the LM head, routers, shared-expert gates)


def _ct():
    from ..io.optional_deps import require

    require("compressed_tensors", "--quantize w8a8|w4a16|fp8")


def check_scheme(name: str, model: str | Path | None = None) -> None:
    """A one-line error, before anything is loaded, for a scheme compressed-tensors cannot write here or
    that does not fit ``model``'s widths (a path or hub id: built on the meta device from its config)."""
    if name not in SCHEMES:
        raise CdmoeError(f"unknown compressed-tensors scheme {name!r}; use {', '.join(SCHEMES)}")
    _ct()
    if model is None:
        return
    if isinstance(model, nn.Module):
        _scheme(name, input_widths(model))
        return
    from transformers import AutoModelForCausalLM

    from ..io.remote_code import trusted
    from ..models.plan import load_config

    config = load_config(model)
    if isinstance(config, dict):  # a remote-code family whose code is not trusted: checked after loading
        return
    if getattr(config, "quantization_config", None):  # block FP8 (others are refused by check_inputs)
        raise CdmoeError(f"{model} is already quantised (block FP8); its outputs keep the source's FP8 bytes and "
                         f"scales: drop --quantize {name}")
    from ..models import register  # noqa: F401  (cdmoe-format inputs build their condensed structure)

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trusted())
    _scheme(name, input_widths(skeleton))


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every ``nn.Linear`` the schemes quantise, in module order (:func:`is_quantised`)."""
    return [(n, m) for n, m in model.named_modules() if is_quantised(n, m)]


def _scheme(name: str, widths: list[int]):
    """compressed-tensors' preset scheme ``name`` for weights of these input widths (one line if unfit)."""
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(SCHEMES[name], ["Linear"])
    scheme.format = FORMATS[name]
    if name == "w4a16":
        scheme.weights.group_size = w4a16_group(widths)
    if name == "fp8" and any(w % 128 for w in widths):
        raise CdmoeError(f"--quantize fp8 (128 x 128 blocks, activations in groups of 128) needs every quantised "
                         f"layer's input width to be a multiple of 128; this model has {widths}; use w8a8 or w4a16")
    return scheme


def _weight_range(weight: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``weight`` (O, I) over each scale's cell: a row (channel), a row's group of
    ``group_size`` columns, or a ``block_structure`` block (edge blocks partial)."""
    w = weight.detach().float()
    if args.strategy == "channel":
        return w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    if args.strategy == "group":
        groups = w.unflatten(-1, (-1, args.group_size))
        return groups.amin(-1), groups.amax(-1)
    if args.strategy == "block":
        rows, cols = args.block_structure
        lo = torch.full((-(-w.shape[0] // rows), -(-w.shape[1] // cols)), float("inf"))
        hi = -lo
        for i in range(lo.shape[0]):
            for j in range(lo.shape[1]):
                cell = w[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols]
                lo[i, j], hi[i, j] = cell.min(), cell.max()
        return lo, hi
    raise CdmoeError(f"unsupported weight strategy {args.strategy}")


def _unfuse(model: nn.Module, record: bool) -> list[int]:
    spec = family_spec(model)
    fused = [b for b in moe_blocks(model, spec) if b.fused]
    for block in fused:
        setattr(block.module, spec.experts_attr, UnfusedExperts.from_fused(block.experts, model.config.hidden_act))
    if fused and record:
        previous = (getattr(model.config, "cdmoe", None) or {}).get("unfused_experts", [])
        to_cdmoe_format(model, {"unfused_experts": sorted(set(previous) | {b.layer_idx for b in fused})})
    return [b.layer_idx for b in fused]


def _stays_native(model: nn.Module, name: str) -> bool:
    """Whether the output keeps the family's own format: transformers loads the per-expert quantised
    experts into its fused experts (it dequantises packed int4 and float8 ones, not int8), by the
    family's own key conversion of the names :class:`UnfusedExperts` writes."""
    if getattr(model.config, "cdmoe", None) is not None or name == "w8a8":
        return False
    from ..models.storage_dtypes import checkpoint_model_keys

    spec = family_spec(model)
    blocks = [b for b in moe_blocks(model, spec) if b.fused]
    if not blocks:
        return True
    prefix = f"{spec.layers_path}.{blocks[0].layer_idx}.{spec.block_attr}.{spec.experts_attr}"
    keys = [f"{prefix}.0.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    params = set(model.state_dict())
    return all(target in params for target in checkpoint_model_keys(model, keys).values())


def scheme_for(model: nn.Module, name: str, group: int | None = None):
    """compressed-tensors' scheme ``name`` for ``model``'s input widths (``group``: w4a16's group size, which
    must divide them all; default: the largest of 128, 64, 32 that does)."""
    widths = input_widths(model)
    scheme = _scheme(name, widths)
    if group is not None and name == "w4a16":
        if any(w % group for w in widths):
            raise CdmoeError(f"w4a16 group {group} does not divide this model's input widths {widths}")
        scheme.weights.group_size = group
    return scheme


def unfuse_for(model: nn.Module, name: str) -> bool:
    """Re-express ``model``'s fused routed experts one ``nn.Linear`` per expert and projection, in place (on the
    meta device too); True when the output keeps the family's own format, else the config becomes cdmoe's
    with ``unfused_experts``."""
    native = _stays_native(model, name)
    _unfuse(model, record=not native)
    return native


@torch.no_grad()
def freeze_scales(root: nn.Module, scheme, scale_dtype: torch.dtype | None = None) -> int:
    """Give every module of ``root`` the schemes quantise (:func:`is_quantised` of its name in ``root``; a
    decoder layer's names match like the whole model's) ``scheme`` and its round-to-nearest scales (in
    ``scale_dtype``; default: the weight's), frozen; the number of such modules."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config
    from compressed_tensors.quantization.utils import calculate_qparams

    modules = quantized_modules(root)
    apply_quantization_config(root, QuantizationConfig(config_groups={"group_0": scheme}, ignore=KEEP),
                              show_progress=False)
    for _, module in modules:
        scale, zero_point = calculate_qparams(*_weight_range(module.weight, scheme.weights), scheme.weights)
        if scale.shape != module.weight_scale.shape:
            raise RuntimeError(f"cdmoe: scale shape {tuple(scale.shape)} != {tuple(module.weight_scale.shape)}")
        module.weight_scale.data = scale.to(scale_dtype or module.weight.dtype)
        module.weight_zero_point.data = zero_point.to(module.weight_zero_point.dtype)
        module.quantization_status = QuantizationStatus.FROZEN
    return len(modules)


@torch.no_grad()
def compress_modules(root: nn.Module, scheme) -> None:
    """Replace the weights of :func:`freeze_scales`' modules of ``root`` by their compressed tensors, in place."""
    from compressed_tensors.compressors import compress_module

    for _, module in quantized_modules(root):
        stored = module.weight_scale.dtype
        # codes on the grid of the stored scale, computed in fp32 (compressed-tensors divides in the weight's dtype)
        module.weight.data, module.weight_scale.data = module.weight.data.float(), module.weight_scale.data.float()
        compress_module(module, scheme.format)
        module.weight_scale.data = module.weight_scale.data.to(stored)


def config_entry(scheme) -> dict:
    """compressed-tensors' ``quantization_config`` of a compressed checkpoint of ``scheme`` (config.json)."""
    from compressed_tensors import __version__ as ct_version
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=KEEP, format=scheme.format,
                                quantization_status="compressed")
    return {"version": ct_version, "quant_method": "compressed-tensors", "sparsity_config": {}, "transform_config": {},
            **config.model_dump(exclude={"quant_method"}, mode="json")}


def prepare_quantized(model: nn.Module, name: str, scale_dtype: torch.dtype | None = None,
                      group: int | None = None) -> nn.Module:
    """Make ``model`` the fake-quantised model of scheme ``name``, in place: experts unfused, every
    quantised module given compressed-tensors' scheme and its round-to-nearest scales (rounded to
    ``scale_dtype``, the dtype they are stored in; default: the weight's), so that its forward computes
    with the quantised weights (and activations); not yet compressed. ``group``: w4a16's group size
    (default: from ``model``'s input widths; the budget planner passes the one it priced, from its source's)."""
    _ct()
    scheme = scheme_for(model, name, group)
    native = unfuse_for(model, name)
    freeze_scales(model, scheme, scale_dtype)
    model._cdmoe_ct = (name, scheme, native)
    return model


def compress_prepared(model: nn.Module) -> nn.Module:
    """Replace the weights of a :func:`prepare_quantized` model by their compressed tensors, in place,
    and put compressed-tensors' ``quantization_config`` into its config (what ``save_pretrained`` writes)."""
    _, scheme, _ = model._cdmoe_ct
    compress_modules(model, scheme)
    model.config.quantization_config = config_entry(scheme)
    return model


def compressed_record(model: nn.Module, moe_layers: int) -> dict:
    """The ``quantization`` entry of ``cdmoe.json`` for a :func:`compress_prepared` model."""
    name, scheme, native = model._cdmoe_ct
    return record_entry(name, scheme, native, moe_layers, len(quantized_modules(model)))


def record_entry(name: str, scheme, native: bool, moe_layers: int, linear_modules: int) -> dict:
    """The ``quantization`` entry of ``cdmoe.json``: scheme ``name`` (compressed-tensors' ``scheme``), the
    output's format (the family's own when ``native``), and how many MoE layers and linear modules it has."""
    weights = scheme.weights
    return {"library": "compressed-tensors", "scheme": name, "preset": SCHEMES[name], "format": scheme.format,
            "weights": {"num_bits": weights.num_bits, "type": str(weights.type), "strategy": str(weights.strategy),
                        "group_size": weights.group_size, "block_structure": weights.block_structure},
            "activations": None if scheme.input_activations is None else
            {"num_bits": scheme.input_activations.num_bits, "type": str(scheme.input_activations.type),
             "strategy": str(scheme.input_activations.strategy), "dynamic": True},
            "targets": "every nn.Linear of the decoder layers (attention, MLPs, experts, condensed MLPs)",
            "kept": KEEP, "moe_layers": moe_layers, "linear_modules": linear_modules,
            "output_format": "family" if native else "cdmoe"}


def quantize_compressed(model: nn.Module, name: str, storage, group: int | None = None) -> tuple[nn.Module, dict]:
    """Quantise ``model`` with scheme ``name`` in place and return it with its record entry. Every
    tensor is first rounded to the dtype it is stored in (``storage``, a
    :class:`~cdmoe.models.storage_dtypes.StoragePlan`), so the weights are quantised from the values
    the source stores; afterwards the kept tensors are cast to it (the source's bytes). Scales are
    stored in fp32, so that q * s is exact wherever it is dequantised (in bf16, compressed-tensors'
    decompression would round it). ``group``: as :func:`prepare_quantized`."""
    from dataclasses import replace

    from ..models.storage_dtypes import cast_to_storage, round_to_storage

    moe_layers = len(moe_blocks(model))
    round_to_storage(model, storage)
    compress_prepared(prepare_quantized(model, name, scale_dtype=torch.float32, group=group))
    scales = {n: torch.float32 for n, _ in model.named_parameters() if n.endswith("weight_scale")}
    cast_to_storage(model, replace(storage, by_name={**storage.by_name, **scales}))
    model.is_quantized = True
    return model, compressed_record(model, moe_layers)
