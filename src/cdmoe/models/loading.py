"""Loading a model and tokenizer with clear errors for the usual mistakes."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import CdmoeError
from ..io.remote_code import remote_code_error, trusted

__all__ = ["checkpoint_dtype", "compute_dtype", "load_model", "load_tokenizer", "resolve_dtype", "round_to_checkpoint_dtype"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "tf32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}  # tf32: see models.placement


def resolve_dtype(name: str | None) -> torch.dtype | str:
    if name in (None, "auto"):
        return "auto"
    if name not in _DTYPES:
        raise CdmoeError(f"unknown dtype {name!r}; use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _check_path(name_or_path: str | Path, weights: bool = False) -> None:
    from .input_checks import check_model_dir

    check_model_dir(name_or_path, weights=weights)


def compute_dtype(dtype: str | None, device: str | torch.device) -> torch.dtype | str:
    """``auto`` computes in the checkpoint's dtype, except half precision on CPU, which is
    slow there and imprecise for divergences: fp32 (the checkpoint is saved back in its dtype)."""
    resolved = resolve_dtype(dtype)
    if resolved == "auto" and str(device).startswith("cpu"):
        return torch.float32
    return resolved


def load_model(name_or_path: str | Path, dtype: str | None = "auto", device: str | torch.device = "auto",
               trust_remote_code: bool | None = None, device_map: str | dict | None = None):
    """``AutoModelForCausalLM.from_pretrained`` in eval mode, with one-line errors.

    ``device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (:func:`cdmoe.models.placement.place`): a GPU
    receives the weights straight from the files (accelerate's device map), never through a CPU copy
    in another dtype; ``auto`` with several GPUs spreads the layers over all of them. ``device_map``
    overrides that placement. The compute dtype is :func:`compute_dtype` of ``dtype`` on that device.
    ``trust_remote_code``: run Python code shipped in the checkpoint (default: the command's
    decision, :func:`cdmoe.io.remote_code.trusted`, off unless ``--trust-remote-code``).

    The checkpoint's own dtype is kept in ``model.config.dtype`` whatever the compute dtype.
    """
    from .placement import place

    placement = place(device)  # a one-line error before anything is read
    if device_map is not None:
        placement = type(placement)(placement.device, device_map, spread=device_map == "auto")
    _check_path(name_or_path, weights=True)
    from . import register  # noqa: F401  (condensed checkpoints load natively)

    trust = trusted() if trust_remote_code is None else trust_remote_code
    device_map = {"device_map": placement.device_map} if placement.device_map is not None else {}
    try:
        fp8_config = _without_fp8_entry(name_or_path, trust)
        if fp8_config is not None:  # block FP8 (or a cast that kept the entry): read as its bf16 cast
            model, info = _load_block_fp8(name_or_path, fp8_config, compute_dtype(dtype, placement.device), trust,
                                          device_map)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(
                str(name_or_path), dtype=compute_dtype(dtype, placement.device), trust_remote_code=trust,
                output_loading_info=True, ignore_mismatched_sizes=True,  # mismatches are refused below, by name
                **device_map,
            )
    except OSError as err:
        raise CdmoeError(
            f"cannot load {name_or_path} ({str(err).splitlines()[0]}); if the hub is unreachable, pass a local directory"
        ) from None
    except (ValueError, RuntimeError, KeyError, TypeError) as err:  # a config or checkpoint the family cannot build
        raise remote_code_error(name_or_path, err) or CdmoeError(
            f"cannot load {name_or_path}: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        ) from None
    _check_loading_info(name_or_path, info)
    if getattr(model, "is_quantized", False):
        from .bnb_cpu import guard_cpu_packing

        guard_cpu_packing(model)  # bitsandbytes' AVX512-BF16 repacking fails on some widths
        return model.eval()  # placed by from_pretrained
    from .storage_dtypes import attach_storage_plan

    attach_storage_plan(model, name_or_path, dtype)  # how it will be saved: per tensor, as the source stores it
    if placement.device_map is not None:  # placed by from_pretrained
        return model.eval()
    return model.to(placement.device).eval()


def _without_fp8_entry(name_or_path, trust: bool):
    """The config of a local checkpoint whose config.json declares fp8 quantisation, without that entry
    (the weights are read as bf16, :mod:`cdmoe.models.fp8_blocks`; the storage plan keeps the entry for
    FP8 outputs); None for any other checkpoint."""
    from transformers import AutoConfig

    from .fp8_blocks import declares_fp8, quantization_entry
    from .input_checks import looks_local, read_config

    if not looks_local(name_or_path):
        if declares_fp8(getattr(AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=trust),
                                "quantization_config", None)):
            raise CdmoeError(f"{name_or_path} is an FP8 checkpoint on the hub; cdmoe reads FP8 weights from a local "
                             "directory: download it first (hf download) and pass that directory")
        return None
    path = Path(str(name_or_path))
    if not declares_fp8(quantization_entry(read_config(path))):
        return None
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    del config.quantization_config
    return config


def _load_block_fp8(path, config, dtype, trust: bool, placement: dict):
    """``from_pretrained`` of a block-FP8 checkpoint with every fp8 weight dequantised by Eq. (1) of
    :mod:`cdmoe.models.fp8_blocks` (bf16, then the compute dtype), as if its bf16 cast were loaded."""
    import contextlib

    from safetensors import safe_open
    from transformers import GenerationConfig
    from transformers.models.auto.auto_factory import _get_model_class

    from .fp8_blocks import block_fp8, dequantizing_state
    from .input_checks import read_config

    path = Path(str(path))
    fp8 = block_fp8(path, read_config(path))
    if dtype == "auto":  # the checkpoint's declared dtype, not the fp8 storage
        dtype = checkpoint_dtype(path) or torch.bfloat16
    with contextlib.ExitStack() as stack:
        if fp8 is None:  # no float8 tensor on disk: a bf16 cast that kept the entry, loaded without it
            model, info = AutoModelForCausalLM.from_pretrained(
                str(path), config=config, dtype=dtype, trust_remote_code=trust, output_loading_info=True,
                ignore_mismatched_sizes=True, **placement)
        else:
            mapping = AutoModelForCausalLM._model_mapping
            if type(config) not in mapping:
                raise CdmoeError(f"{path} is an FP8 checkpoint of a family transformers does not have ({config.model_type}); "
                                 "cdmoe reads FP8 weights of native families only: dequantise it to bf16 first")
            handles = {name: stack.enter_context(safe_open(path / name, "pt")) for name in sorted(set(fp8.files.values()))}
            state = dequantizing_state(fp8.files, lambda k: handles[fp8.files[k]].get_slice(k), fp8)
            model, info = _get_model_class(config, mapping).from_pretrained(  # the Auto class needs a path
                None, config=config, state_dict=state, dtype=dtype, output_loading_info=True,
                ignore_mismatched_sizes=True, **placement)
    model.config._name_or_path = str(path)
    if (path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model, info


def _check_loading_info(name_or_path, info: dict) -> None:
    """Refuse a checkpoint with tensors missing (transformers would initialise them at random) or of
    the wrong shape: a condensed model of garbage must never be written."""
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: str(m[0]))
    if mismatched:
        name, got, want = (list(mismatched[0]) + [None, None])[:3]
        raise CdmoeError(f"{name_or_path}: tensor {name} has shape {tuple(got or ())} on disk, the config expects "
                         f"{tuple(want or ())} (and {len(mismatched) - 1} more); the checkpoint does not match its "
                         "config.json")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise CdmoeError(f"{name_or_path} has no tensor for {missing[0]} (and {len(missing) - 1} more); the checkpoint "
                         "is incomplete or not of this config's family")


def checkpoint_dtype(name_or_path: str | Path) -> torch.dtype | None:
    """The dtype a checkpoint stores its weights in, from its config.json (None if unknown)."""

    from .input_checks import read_config

    if not (Path(str(name_or_path)) / "config.json").exists():
        return None
    data = read_config(Path(str(name_or_path)))
    name = data.get("dtype") or data.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


def round_to_checkpoint_dtype(model, source: str | Path | None, dtype: str | None):
    """Round ``model``'s weights (e.g. freshly fused fp32 ones) to the dtypes they will be stored in,
    tensor by tensor (:mod:`cdmoe.models.storage_dtypes`), keeping the compute dtype, so that what is
    evaluated is what will be saved. Returns the :class:`~cdmoe.models.storage_dtypes.StoragePlan` to save with."""
    from .storage_dtypes import plan_of, round_to_storage

    plan = plan_of(model, source, dtype)
    round_to_storage(model, plan)
    return plan


_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "*.model", "*.tiktoken")


def _check_tokenizer_files(path: Path) -> None:
    """A local model directory has a tokenizer's vocabulary, and its tokenizer JSON files parse (one line
    naming the file otherwise)."""
    if not path.is_dir():
        return
    if not any(next(path.glob(pattern), None) for pattern in _VOCAB_FILES):
        raise CdmoeError(f"{path} has no tokenizer files (tokenizer.json, or tokenizer.model, or vocab.json and "
                         "merges.txt); copy them from the original model's directory")
    from .input_checks import read_json_object

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (path / name).exists():
            read_json_object(path / name, f"restore {name} from the original model's directory")


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool | None = None):
    """``AutoTokenizer.from_pretrained`` with one-line errors (``trust_remote_code`` as in :func:`load_model`)."""
    _check_path(name_or_path)
    _check_tokenizer_files(Path(str(name_or_path)).expanduser())
    try:
        return AutoTokenizer.from_pretrained(
            str(name_or_path), trust_remote_code=trusted() if trust_remote_code is None else trust_remote_code)
    except Exception as err:  # tokenizers fail in many types (OSError, ValueError, KeyError on a bad tokenizer.json)
        found = remote_code_error(name_or_path, err) if isinstance(err, (OSError, ValueError)) else None
        message = " ".join(str(err).split()) or "no message"
        raise found or CdmoeError(f"cannot load a tokenizer from {name_or_path} ({type(err).__name__}: {message}); "
                                  "check its tokenizer.json and tokenizer_config.json, or copy them from the "
                                  "original model's directory") from None
