"""Weight-only quantisation of the experts (Expert Slimming, 2406.02500) with bitsandbytes.

bitsandbytes quantises ``nn.Linear`` weights and runs on CPU and GPU; transformers saves
its 8-bit and 4-bit weights to safetensors and loads them back from ``config.json``'s
``quantization_config``. What is quantised: every routed expert of the remaining sparse
MoE layers and every condensed MLP (Eq. 3). Attention, embeddings, routers, shared
experts of sparse layers and the LM head keep the checkpoint's dtype.

transformers 5 stores a family's experts as fused 3-D tensors, which no ``nn.Linear``
quantiser sees; they are first re-expressed as one ``nn.Linear`` per projection and expert
(:class:`~cdmoe.models.modeling_cdmoe.UnfusedExperts`, exactly the same weights), recorded in
``config.json`` so the checkpoint rebuilds that layout when it loads.

Bits: ``int8`` is LLM.int8 (int8 weights, one fp32 scale per output row); ``int4`` is
NF4 (two 4-bit codes per byte, one fp32 absmax per block of 64 weights).
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from ..errors import CdmoeError
from ..io.optional_deps import require
from ..io.remote_code import trusted
from ..io.write_rule import work_dir
from ..models.adapter import family_spec, moe_blocks
from ..models.bnb_cpu import guard_cpu_packing
from ..models.condensed import to_cdmoe_format
from ..models.modeling_cdmoe import UnfusedExperts

__all__ = ["BITS", "check_quantize", "layers_quantized", "quantized_bytes", "quantize_model", "target_patterns", "unfuse_experts"]

BITS = ("int8", "int4")
NF4_BLOCK = 64
NF4_STATE_BYTES = 80  # bitsandbytes' serialised quant-state JSON, per module (approximate)


def _bnb_config(bits: str, skip: list[str], compute_dtype: torch.dtype):
    check_quantize(bits)
    from transformers import BitsAndBytesConfig

    if bits == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if bits == "int4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                                  llm_int8_skip_modules=skip)
    raise CdmoeError(f"unknown --quantize {bits!r}; use {' or '.join(BITS)}")


def check_quantize(bits: str | None, needed_by: str | None = None, model=None) -> None:
    """A one-line error for an unknown ``--quantize`` or a missing library (before anything is loaded);
    ``needed_by`` names what asked for it (default ``--quantize BITS``). ``int8``/``int4`` are bitsandbytes'
    (this module), ``w8a8``/``w4a16``/``fp8`` compressed-tensors' (:mod:`cdmoe.methods.compressed`; with
    ``model``, a path or hub id, also whether its widths fit the scheme)."""
    from .compressed import SCHEMES, check_scheme

    if bits is None:
        return
    if bits in SCHEMES:
        require("compressed_tensors", needed_by or f"--quantize {bits}")
        check_scheme(bits, model)
        return
    if bits not in BITS:
        raise CdmoeError(f"unknown --quantize {bits!r}; use {' | '.join((*SCHEMES, *BITS))}")
    require("bitsandbytes", needed_by or f"--quantize {bits}")


def unfuse_experts(model: nn.Module) -> nn.Module:
    """Re-express fused 3-D experts as ``nn.Linear`` trios (same weights), in place."""
    spec = family_spec(model)
    fused = [b for b in moe_blocks(model, spec) if b.fused]
    for block in fused:
        setattr(block.module, spec.experts_attr, UnfusedExperts.from_fused(block.experts, model.config.hidden_act))
    if fused:
        previous = (getattr(model.config, "cdmoe", None) or {}).get("unfused_experts", [])
        to_cdmoe_format(model, {"unfused_experts": sorted(set(previous) | {b.layer_idx for b in fused})})
    return model


def target_patterns(model: nn.Module) -> list[str]:
    """Regexes of the module names to quantise: routed experts and condensed MLPs."""
    spec = family_spec(model)
    condensed = sorted(int(i) for i in ((getattr(model.config, "cdmoe", None) or {}).get("condensed_layers") or {}))
    mlp_name = re.escape(f"{spec.layers_path}.") + "{}" + re.escape(f".{spec.block_attr}.")
    patterns = [r".*" + re.escape(f".{spec.experts_attr}.")]
    if condensed:
        # module names after Block Drop are renumbered; map original ids to positions
        dropped = {int(i) for i in (model.config.cdmoe.get("dropped_blocks") or [])}
        position = {i: i - sum(d < i for d in dropped) for i in condensed}
        patterns.append(mlp_name.format("(?:" + "|".join(str(position[i]) for i in condensed) + ")"))
    return patterns


def quantized_bytes(model: nn.Module, bits: str, dtype: torch.dtype | None = None) -> int:
    """Predicted safetensors payload bytes of ``model`` after :func:`quantize_model` (no headers),
    the other floating-point tensors stored in ``dtype`` (default: the model's)."""
    size = torch.tensor([], dtype=dtype or model.dtype).element_size()
    wanted = re.compile("|".join(f"(?:{p})" for p in target_patterns(model)))
    total = 0
    quantised = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and wanted.match(name):
            quantised.add(f"{name}.weight")
            out_f, in_f = module.weight.shape
            n = out_f * in_f
            if bits == "int8":
                total += n + 4 * out_f + 1  # int8 weights + fp32 row scales (SCB) + format byte
            else:  # packed codes + fp32 absmax per block + 16-entry code book + ~80-byte JSON quant state
                total += n // 2 + 4 * -(-n // NF4_BLOCK) + 4 * 16 + NF4_STATE_BYTES
    stored = dict(model.named_parameters())  # tied weights once, as on disk
    stored.update((n, b) for n, b in model.named_buffers() if n in model.state_dict())
    for name, tensor in stored.items():
        if name not in quantised:
            total += tensor.numel() * (size if tensor.is_floating_point() else tensor.element_size())
    return total


def quantize_model(model: nn.Module, bits: str, storage=None) -> nn.Module:
    """A bitsandbytes-quantised copy of ``model`` (experts and condensed MLPs), on the model's device.

    The model is cast in place to its stored dtypes (``storage``, a
    :class:`~cdmoe.models.storage_dtypes.StoragePlan`; default: all in the model's dtype), saved to a
    temporary directory and loaded back through transformers with a ``BitsAndBytesConfig``:
    the same path a user's ``from_pretrained`` takes, so what is evaluated is what is saved. The
    reloaded model holds its unquantised tensors as transformers loads them for bitsandbytes: in
    ``storage.default``, except what the family keeps in fp32 (routers); a tensor the source stores
    in fp32 by no family rule (an fp32 norm) is therefore saved in the checkpoint's dtype here, since
    bitsandbytes' model runs in one compute dtype.
    """
    from transformers import AutoModelForCausalLM

    from ..models import register  # noqa: F401  (cdmoe-format checkpoints load natively)
    from ..models.storage_dtypes import StoragePlan, cast_to_storage

    device = next(model.parameters()).device
    unfuse_experts(model)
    skip = ["(?!" + "|".join(f"(?:{p})" for p in target_patterns(model)) + ").*"]
    storage = storage if storage is not None else StoragePlan(default=model.dtype)
    dtype = storage.default
    config = _bnb_config(bits, skip, dtype)
    with work_dir("cdmoe-quant-", "quantisation round trip") as tmp:
        cast_to_storage(model, storage)
        model.save_pretrained(tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantized = AutoModelForCausalLM.from_pretrained(
                tmp, quantization_config=config, device_map={"": str(device)}, dtype=dtype, trust_remote_code=trusted()
            )
    guard_cpu_packing(quantized)
    return quantized.eval()


def layers_quantized(model: nn.Module) -> int:
    """How many Linear modules bitsandbytes replaced (a sanity count for records)."""
    return sum(1 for _, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes"))
