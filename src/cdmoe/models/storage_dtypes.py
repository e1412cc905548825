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
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

__all__ = ["StoragePlan", "attach_storage_plan", "cast_to_storage", "checkpoint_model_keys", "plan_of",
           "round_to_storage", "source_dtypes", "storage_plan"]

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


def storage_plan(model: nn.Module, source: str | Path | None, dtype: str | torch.dtype | None = "auto") -> StoragePlan:
    """Where ``model`` (loaded from ``source``, possibly in another compute dtype) is saved:
    per tensor, the source's dtype (``dtype="auto"``) or ``dtype`` with transformers' fp32 rules."""
    from .loading import resolve_dtype

    wanted = resolve_dtype(dtype) if isinstance(dtype, str) or dtype is None else dtype
    if wanted != "auto":
        return StoragePlan(default=wanted, fp32=_fp32_pattern(model, wanted), requested=dtype)
    from .loading import checkpoint_dtype

    source = source if source is not None else getattr(model.config, "_name_or_path", None) or None
    default = (checkpoint_dtype(source) if source is not None else None) or _config_dtype(model) or model.dtype
    on_disk = source_dtypes(source) if source is not None else {}
    by_name = {}
    if on_disk:
        for key, target in checkpoint_model_keys(model, on_disk).items():
            by_name.setdefault(target, on_disk[key])
    return StoragePlan(default=default, by_name=by_name, fp32=_fp32_pattern(model, default), requested="auto")


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


@torch.no_grad()
def _recast(model: nn.Module, plan: StoragePlan, back: bool) -> None:
    for name, mod, leaf, tensor in _tensors(model):
        target = plan.dtype_for(name, tensor)
        if tensor.dtype == target or tensor.device.type == "meta":
            continue
        value = tensor.data.to(target)
        if back:
            value = value.to(tensor.dtype)
        if leaf in mod._parameters:
            mod._parameters[leaf].data = value
        else:
            mod._buffers[leaf] = value


def round_to_storage(model: nn.Module, plan: StoragePlan) -> None:
    """Round every tensor to its stored dtype and back, in place: what is evaluated is what is saved."""
    _recast(model, plan, back=True)


def cast_to_storage(model: nn.Module, plan: StoragePlan) -> None:
    """Cast every tensor to the dtype it is stored in, in place (before ``save_pretrained``);
    ``config.dtype`` becomes the plan's default."""
    _recast(model, plan, back=False)
    model.config.dtype = plan.default
