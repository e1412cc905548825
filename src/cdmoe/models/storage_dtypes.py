"""The dtype each tensor of an output is stored in: the source's, tensor by tensor.

cdmoe computes in fp32 on CPU, but an output must hold every tensor a method did not
change exactly as the source checkpoint stored it: same dtype, same bytes. A single
``model.to(bf16)`` before saving breaks that for the tensors a family keeps in fp32 on
purpose (DeepSeek-V3's ``gate.weight`` and ``e_score_correction_bias``, transformers'
``_keep_in_fp32_modules_strict``): in layers that were not condensed, some tokens would
pick other experts than in the original.

A :class:`StoragePlan` maps each model tensor name to the dtype it is written in:

- ``dtype="auto"``: the dtype the source's safetensors file stores under that name (read from
  the file headers, names mapped through transformers' own key conversion, as
  ``from_pretrained`` maps them); a tensor the source does not have (a condensed MLP, Eq. 3)
  is written in the checkpoint's dtype (``config.json``'s ``dtype``), or fp32 where
  transformers' dtype plan keeps that name in fp32.
- an explicit dtype (``--dtype bf16``): that dtype, except the names transformers keeps in fp32
  at that dtype (``PreTrainedModel._get_dtype_plan``).

Since every source dtype (bf16, fp16, fp32) is exactly representable in the fp32 compute
dtype, casting a loaded tensor back to its source dtype gives the source's bytes.

A block-FP8 source (:mod:`cdmoe.models.fp8_blocks`) is read as its bf16 cast, so its fp8 weights are
planned as bf16, and the plan keeps the source's :class:`~cdmoe.models.fp8_blocks.BlockFp8` (``fp8``):
with ``dtype="auto"`` the output is FP8 again (:mod:`cdmoe.checkpoint.fp8_output`), and a new Linear
weight (a condensed MLP) is rounded to what its block quantisation will hold (:func:`round_to_storage`).
A ``quantization_config: fp8`` whose weights are not fp8 on disk, or an explicit dtype, gives no FP8
output; the dropped entry is kept in ``dropped_quantization`` for the record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .fp8_blocks import BlockFp8

__all__ = ["StoragePlan", "attach_storage_plan", "cast_to_storage", "checkpoint_model_keys", "fp8_new_names",
           "plan_of", "round_to_storage", "source_dtypes", "storage_plan"]

_FLOAT8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}
PLAN_ATTR = "_cdmoe_storage_plan"  # set on a model by cdmoe.load_model: its plan, made before any method renames tensors

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


@dataclass
class StoragePlan:
    """``by_name``: model state-dict name -> stored dtype; ``default``: for names not listed;
    ``fp32``: a regex of the names transformers keeps in fp32 (applied to unlisted names)."""

    default: torch.dtype
    by_name: dict[str, torch.dtype] = field(default_factory=dict)
    fp32: re.Pattern | None = None
    requested: str | torch.dtype | None = "auto"  # the --dtype it was made for
    fp8: BlockFp8 | None = None  # an FP8 output: the source's blocks, scales and files
    source: Path | None = None  # the source directory (its fp8 bytes are copied into FP8 outputs)
    dropped_quantization: dict | None = None  # a source quantization_config the output does not keep

    def fp8_new(self, name: str, module: nn.Module, leaf: str) -> bool:
        """Whether tensor ``name`` (``leaf`` of ``module``) is block-quantised in the output although
        the source does not have it: a new Linear weight (Eq. 3's fused MLP) outside the entry's
        ``modules_to_not_convert``."""
        return name not in self.by_name and self._fp8_linear(name, module, leaf)

    def _fp8_linear(self, name: str, module: nn.Module, leaf: str) -> bool:
        if self.fp8 is None or leaf != "weight" or not isinstance(module, nn.Linear):
            return False
        from transformers.quantizers.quantizers_utils import should_convert_module

        return should_convert_module(name.rpartition(".")[0], self.fp8.entry.get("modules_to_not_convert"))

    def record(self) -> dict:
        """What the record (``cdmoe.json``) says about the source's quantisation ({} if none)."""
        if self.fp8 is not None:
            return {"source_quantization": {"method": "fp8", "weight_block_size": list(self.fp8.block), "output": (
                "fp8: tensors kept from the source with its bytes and scales, new Linear weights block-quantised")}}
        if self.dropped_quantization is not None:
            return {"source_quantization": {"dropped_quantization_config": self.dropped_quantization, "output": (
                "not quantised: the source's weights are not fp8 on disk" if self.requested == "auto"
                else f"not quantised: --dtype {self.requested}")}}
        return {}

    def dtype_for(self, name: str, tensor: torch.Tensor) -> torch.dtype:
        if not tensor.is_floating_point():
            return tensor.dtype
        if name in self.by_name:
            return self.by_name[name]
        if self.fp32 is not None and self.fp32.search(name):
            return torch.float32
        return self.default


def checkpoint_model_keys(model: nn.Module, checkpoint_keys) -> dict[str, str]:
    """{checkpoint tensor name: the model state-dict name it loads into}, through transformers'
    own renaming and conversion rules (what ``from_pretrained`` applies). Fused targets (3-D
    experts) appear once per source tensor."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta = model.state_dict()
    return {key: rename_source_key(key, renamings, converters, model.base_model_prefix, meta)[0]
            for key in checkpoint_keys}


def _local_checkpoint(source: str | Path) -> Path | None:
    """The local directory of ``source`` (a path, or a hub id already in the local cache)."""
    path = Path(str(source)).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), local_files_only=True, allow_patterns=["*.json"]))
    except Exception:  # not a hub id, or not cached: no per-tensor dtypes
        return None


def source_dtypes(source: str | Path) -> dict[str, torch.dtype]:
    """{checkpoint tensor name: stored dtype} from the safetensors headers of ``source`` ({} if unknown)."""
    from .input_checks import safetensors_header, shard_files

    directory = _local_checkpoint(source)
    if directory is None:
        return {}
    dtypes: dict[str, torch.dtype] = {}
    for name in shard_files(directory):
        if not (directory / name).exists():
            return {}
        for key, info in safetensors_header(directory / name).items():
            if key != "__metadata__" and _SAFETENSORS_DTYPES.get(info["dtype"]) is not None:
                dtypes[key] = _SAFETENSORS_DTYPES[info["dtype"]]
    return dtypes


def _fp32_pattern(model: nn.Module, dtype: torch.dtype) -> re.Pattern | None:
    from transformers.core_model_loading import build_glob_alternation

    get_plan = getattr(model, "_get_dtype_plan", None)
    plan = get_plan(dtype) if get_plan is not None else {}
    names = [name for name, d in plan.items() if d == torch.float32]
    return build_glob_alternation(names)[0] if names else None


def _config_dtype(model: nn.Module) -> torch.dtype | None:
    stored = getattr(model.config, "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else None


def _source_fp8(source: str | Path | None) -> tuple[Path | None, BlockFp8 | None, dict | None]:
    """(local directory, its block FP8, its quantization_config entry) of ``source``."""
    from .fp8_blocks import block_fp8, quantization_entry
    from .input_checks import read_config

    directory = _local_checkpoint(source) if source is not None else None
    if directory is None or not (directory / "config.json").exists():
        return directory, None, None
    config = read_config(directory)
    return directory, block_fp8(directory, config), quantization_entry(config)


def storage_plan(model: nn.Module, source: str | Path | None, dtype: str | torch.dtype | None = "auto") -> StoragePlan:
    """Where ``model`` (loaded from ``source``, possibly in another compute dtype) is saved:
    per tensor, the source's dtype (``dtype="auto"``) or ``dtype`` with transformers' fp32 rules."""
    from .fp8_blocks import declares_fp8
    from .loading import resolve_dtype

    source = source if source is not None else getattr(model.config, "_name_or_path", None) or None
    directory, fp8, entry = _source_fp8(source)
    dropped = entry if declares_fp8(entry) else None
    wanted = resolve_dtype(dtype) if isinstance(dtype, str) or dtype is None else dtype
    if wanted != "auto":
        return StoragePlan(default=wanted, fp32=_fp32_pattern(model, wanted), requested=dtype, dropped_quantization=dropped)
    from .loading import checkpoint_dtype

    default = (checkpoint_dtype(source) if source is not None else None) or _config_dtype(model) or model.dtype
    on_disk = source_dtypes(source) if source is not None else {}
    if fp8 is not None:  # fp8 weights are read as bf16 (Eq. 1 of fp8_blocks); their scales load into nothing
        on_disk = {k: torch.bfloat16 if k in fp8.scales else d for k, d in on_disk.items() if k not in fp8.scale_names}
    by_name = {}
    if on_disk:
        for key, target in checkpoint_model_keys(model, on_disk).items():
            by_name.setdefault(target, on_disk[key])
    return StoragePlan(default=default, by_name=by_name, fp32=_fp32_pattern(model, default), requested="auto",
                       fp8=fp8, source=directory, dropped_quantization=dropped if fp8 is None else None)


def attach_storage_plan(model: nn.Module, source: str | Path | None, dtype: str | torch.dtype | None = "auto") -> None:
    """Make ``model``'s storage plan now, while its tensor names are the source's (a method may
    rename them: a condensed layer, fewer experts), and keep it on the model for :func:`plan_of`."""
    setattr(model, PLAN_ATTR, storage_plan(model, source, dtype))


def plan_of(model: nn.Module, source: str | Path | None = None, dtype: str | torch.dtype | None = "auto") -> StoragePlan:
    """The plan :func:`attach_storage_plan` kept on ``model`` (if it was made for ``dtype``), else a new one."""
    kept = getattr(model, PLAN_ATTR, None)
    if kept is not None and (dtype in (None, "auto") or kept.requested == dtype):
        return kept
    return storage_plan(model, source, dtype)


def _tensors(model: nn.Module):
    """(state-dict name, owner module, leaf name, tensor) of every parameter and persistent buffer, each once
    (not those of bitsandbytes' quantised modules)."""
    seen = set()
    for mod_name, mod in model.named_modules():
        if type(mod).__module__.startswith("bitsandbytes"):  # quantised weights and their scales keep their own format
            continue
        entries = list(mod._parameters.items()) + [(n, b) for n, b in mod._buffers.items()
                                                   if n not in mod._non_persistent_buffers_set]
        for leaf, tensor in entries:
            if tensor is None or id(tensor) in seen or tensor.dtype in _FLOAT8:  # float8: quantised codes
                continue
            seen.add(id(tensor))
            yield (f"{mod_name}.{leaf}" if mod_name else leaf), mod, leaf, tensor


def fp8_new_names(model: nn.Module, plan: StoragePlan) -> set[str]:
    """The state-dict names of ``model`` that an FP8 output block-quantises although the source does not
    have them (:meth:`StoragePlan.fp8_new`); empty unless the plan writes FP8."""
    return {name for name, mod, leaf, _ in _tensors(model) if plan.fp8_new(name, mod, leaf)}


@torch.no_grad()
def _recast(model: nn.Module, plan: StoragePlan, back: bool, source=None) -> None:
    """Cast every tensor to its stored dtype (``back``: and back to its own). ``source``
    (:class:`~cdmoe.models.fp8_blocks.SourceBlocks`, FP8 plans with ``back``): a Linear weight that
    will be block-quantised (a new one, or an fp8 one of the source a method changed) is rounded
    through its blocks too."""
    from .fp8_blocks import dequantize, quantize

    for name, mod, leaf, tensor in _tensors(model):
        if tensor.device.type == "meta":
            continue
        target = plan.dtype_for(name, tensor)
        quantized = source is not None and plan._fp8_linear(name, mod, leaf) and (
            name not in plan.by_name or name in plan.fp8.scales and source.unchanged(name, tensor.data) is None)
        if tensor.dtype == target and not quantized:
            continue
        value = tensor.data.to(target)
        if quantized:  # what its blocks will hold on disk
            value = dequantize(*quantize(value, plan.fp8.block), plan.fp8.block)
        if back:
            value = value.to(tensor.dtype)
        if leaf in mod._parameters:
            mod._parameters[leaf].data = value
        else:
            mod._buffers[leaf] = value


def round_to_storage(model: nn.Module, plan: StoragePlan) -> None:
    """Round every tensor to its stored dtype and back, in place: what is evaluated is what is saved."""
    if plan.fp8 is None:
        _recast(model, plan, back=True)
        return
    from .fp8_blocks import SourceBlocks

    with SourceBlocks(plan.source, plan.fp8) as source:
        _recast(model, plan, back=True, source=source)


def cast_to_storage(model: nn.Module, plan: StoragePlan) -> None:
    """Cast every tensor to the dtype it is stored in, in place (before ``save_pretrained``);
    ``config.dtype`` becomes the plan's default."""
    _recast(model, plan, back=False)
    model.config.dtype = plan.default
