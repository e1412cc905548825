"""Loading a model and tokenizer with clear errors for the usual mistakes."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .errors import CdmoeError
from .remote_code import remote_code_error, trusted

__all__ = ["checkpoint_dtype", "compute_dtype", "load_model", "load_tokenizer", "resolve_dtype", "round_to_checkpoint_dtype"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str | None) -> torch.dtype | str:
    if name in (None, "auto"):
        return "auto"
    if name not in _DTYPES:
        raise CdmoeError(f"unknown dtype {name!r}; use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _check_path(name_or_path: str | Path) -> None:
    text = str(name_or_path)
    looks_local = text.startswith((".", "/", "~")) or Path(text).exists() or text.count("/") > 1
    if looks_local and not Path(text).expanduser().exists():
        raise CdmoeError(f"model path {text} does not exist; pass a local model directory or a hub model id")
    if looks_local and Path(text).is_dir() and not (Path(text) / "config.json").exists():
        raise CdmoeError(f"{text} has no config.json; pass a Hugging Face model directory")


def compute_dtype(dtype: str | None, device: str) -> torch.dtype | str:
    """``auto`` computes in the checkpoint's dtype, except half precision on CPU, which is
    slow there and imprecise for divergences: fp32 (the checkpoint is saved back in its dtype)."""
    resolved = resolve_dtype(dtype)
    if resolved == "auto" and str(device).startswith("cpu"):
        return torch.float32
    return resolved


def load_model(name_or_path: str | Path, dtype: str | None = "auto", device: str = "cpu",
               trust_remote_code: bool | None = None, device_map: str | dict | None = None):
    """``AutoModelForCausalLM.from_pretrained`` in eval mode, with one-line errors.

    ``trust_remote_code``: run Python code shipped in the checkpoint (default: the command's
    decision, :func:`cdmoe.remote_code.trusted`, off unless ``--trust-remote-code``).

    The checkpoint's own dtype is kept in ``model.config.dtype`` whatever the compute dtype.
    ``device_map`` (e.g. ``"auto"`` for several GPUs) places the layers with accelerate instead of ``device``.
    """
    _check_path(name_or_path)
    from . import register  # noqa: F401  (condensed checkpoints load natively)

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(name_or_path), dtype=compute_dtype(dtype, device),
            trust_remote_code=trusted() if trust_remote_code is None else trust_remote_code,
            **({"device_map": device_map} if device_map is not None else {}),
        )
    except OSError as err:
        raise CdmoeError(
            f"cannot load {name_or_path} ({str(err).splitlines()[0]}); if the hub is unreachable, pass a local directory"
        ) from None
    except ValueError as err:
        raise remote_code_error(name_or_path, err) or CdmoeError(
            f"cannot load {name_or_path}: {str(err).splitlines()[0]}") from None
    if not getattr(model, "is_quantized", False):
        from .storage_dtypes import attach_storage_plan

        attach_storage_plan(model, name_or_path, dtype)  # how it will be saved: per tensor, as the source stores it
    if getattr(model, "is_quantized", False):
        from .quantize import guard_cpu_packing

        guard_cpu_packing(model)  # bitsandbytes' AVX512-BF16 repacking fails on some widths
    if getattr(model, "is_quantized", False) or device_map is not None:  # placed by from_pretrained
        return model.eval()
    return model.to(device).eval()


def checkpoint_dtype(name_or_path: str | Path) -> torch.dtype | None:
    """The dtype a checkpoint stores its weights in, from its config.json (None if unknown)."""
    import json

    path = Path(str(name_or_path)) / "config.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    name = data.get("dtype") or data.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


def round_to_checkpoint_dtype(model, source: str | Path | None, dtype: str | None):
    """Round ``model``'s weights (e.g. freshly fused fp32 ones) to the dtypes they will be stored in,
    tensor by tensor (:mod:`cdmoe.storage_dtypes`), keeping the compute dtype, so that what is
    evaluated is what will be saved. Returns the :class:`~cdmoe.storage_dtypes.StoragePlan` to save with."""
    from .storage_dtypes import plan_of, round_to_storage

    plan = plan_of(model, source, dtype)
    round_to_storage(model, plan)
    return plan


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool | None = None):
    """``AutoTokenizer.from_pretrained`` with one-line errors (``trust_remote_code`` as in :func:`load_model`)."""
    _check_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(
            str(name_or_path), trust_remote_code=trusted() if trust_remote_code is None else trust_remote_code)
    except (OSError, ValueError) as err:
        raise remote_code_error(name_or_path, err) or CdmoeError(f"cannot load a tokenizer from {name_or_path}: {str(err).splitlines()[0]}") from None
