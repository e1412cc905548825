"""Decoder layers in memory only while they are needed (sequential mode), or always (whole mode).

A *layer store* gives the search and the writer one decoder layer at a time::

    with store.resident(i) as layer:   # layer i's weights on the device, in the compute dtype
        ...                            # released again on exit (sequential mode)

:class:`SequentialStore` builds the model skeleton with every parameter on the meta device
(accelerate's ``init_empty_weights(include_buffers=False)``, so buffers such as rotary
``inv_freq`` are computed by the modules' own ``__init__``, never loaded), loads the
non-layer weights (embeddings, final norm, lm_head) once, and reads decoder layer i's
tensors from the checkpoint's safetensors shards only inside ``resident(i)``. Keys go
through transformers' own conversion (``get_model_conversion_mapping`` +
``convert_and_load_state_dict_in_model``, what ``from_pretrained`` runs), so per-expert
keys on disk (``mlp.experts.0.gate_proj.weight``) become the fused 3-D expert tensors
exactly as in a whole load. :class:`ResidentStore` is the whole mode: a loaded model.

Both stores hold the *condensed set* of Algorithm 2 (``set_condensed``): in whole mode the
fused condensed MLPs are swapped in at once; in sequential mode only the (experts, gates)
are kept and the fused MLP is built from the original block each time its layer is loaded,
so nothing heavier than the layer inputs is cached.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..errors import CdmoeError
from ..models.adapter import MoEBlock, attr_path, decoder_layers
from ..models.families import FamilySpec

__all__ = ["ResidentStore", "SequentialStore", "checkpoint_tensor_files"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def checkpoint_tensor_files(path: str | Path) -> dict[str, str]:
    """{checkpoint tensor name: shard file name} of a safetensors checkpoint directory."""
    path = Path(path)
    if (path / INDEX_NAME).exists():
        return dict(json.loads((path / INDEX_NAME).read_text())["weight_map"])
    if (path / SINGLE_NAME).exists():
        from safetensors import safe_open

        with safe_open(path / SINGLE_NAME, "pt") as f:
            return {k: SINGLE_NAME for k in f.keys()}
    raise CdmoeError(f"{path} has no safetensors weights ({INDEX_NAME} or {SINGLE_NAME}); sequential mode reads a "
                     "local safetensors checkpoint (download it first, or use --mode whole for .bin or hub ids)")


class ResidentStore:
    """Whole mode: every layer of ``model`` is already in memory."""

    sequential = False

    def __init__(self, model: nn.Module, spec: FamilySpec):
        self.model = model
        self.spec = spec
        self.layers = decoder_layers(model, spec)
        self.device = next(model.parameters()).device
        self._originals: dict[int, nn.Module] = {}

    @contextlib.contextmanager
    def resident(self, idx: int) -> Iterator[nn.Module]:
        yield self.layers[idx]

    def candidate(self, block: MoEBlock, experts: tuple[int, ...], gates: tuple[float, ...]):
        """What ``set_condensed`` takes for this layer: here the fused MLP, built now."""
        from ..models.condensed import fuse_condensed_mlp

        return fuse_condensed_mlp(block, experts, gates)

    def set_condensed(self, idx: int, candidate) -> None:
        """Swap the condensed MLP ``candidate`` into layer ``idx`` (None: the original block back)."""
        attr = self.spec.block_attr
        self._originals.setdefault(idx, getattr(self.layers[idx], attr))
        setattr(self.layers[idx], attr, candidate if candidate is not None else self._originals[idx])


class SequentialStore:
    """A model skeleton on the meta device whose decoder layers load from disk on demand.

    ``device``/``dtype``: where and in what dtype layers are computed (the checkpoint is cast on load).
    """

    sequential = True

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, trust_remote_code: bool | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from ..io.remote_code import remote_code_error, trusted
        from ..models import register  # noqa: F401  (condensed checkpoints as input)
        from ..models.adapter import family_spec
        from ..models.fp8_blocks import declares_fp8

        trust_remote_code = trusted() if trust_remote_code is None else trust_remote_code
        self.trust_remote_code = trust_remote_code
        self.path = Path(path)
        self._originals: dict[int, nn.Module] = {}  # original MoE blocks while a fused MLP stands in
        self.device = torch.device(device)
        self.dtype = dtype
        self.files = checkpoint_tensor_files(self.path)
        self.fp8 = _block_fp8(self.path)  # fp8 weights are read as their bf16 cast (models/fp8_blocks.py)
        try:
            config = AutoConfig.from_pretrained(self.path, trust_remote_code=trust_remote_code)
            if declares_fp8(getattr(config, "quantization_config", None)):
                del config.quantization_config  # the layers hold bf16 values; an FP8 output gets it back
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        except ValueError as err:
            raise remote_code_error(self.path, err) or CdmoeError(
                f"cannot build the model of {self.path}: {str(err).splitlines()[0]}") from None
        model.config._name_or_path = str(self.path)
        self.model = model.eval()
        self.spec = family_spec(self.model)
        self.layers = decoder_layers(self.model, self.spec)
        self._prefix = self.spec.layers_path + "."
        self._by_layer, rest = self._group_keys()
        self._refs: dict[int, int] = {}
        self.loads = 0  # decoder layers read from disk so far
        self._condensed: dict[int, tuple[tuple[int, ...], tuple[float, ...]]] = {}
        self._load(rest, what="the non-layer weights")
        self.model.tie_weights()
        for name, buf in list(self.model.named_buffers()):  # computed buffers (rotary inv_freq, ...) to the device
            if buf.device.type != "meta":
                _set_tensor(self.model, name, buf.to(self.device))
        missing = [n for n, t in _persistent_tensors(self.model) if t.device.type == "meta" and not n.startswith(self._prefix)]
        if missing:
            raise CdmoeError(f"{self.path} has no tensor for {missing[0]} (and {len(missing) - 1} more); is it complete?")

    # checkpoint keys ------------------------------------------------------------------------
    def _group_keys(self) -> tuple[dict[int, list[str]], list[str]]:
        """Checkpoint keys per decoder layer (by their name after transformers' renaming), and the rest."""
        from ..models.storage_dtypes import checkpoint_model_keys

        pattern = re.compile(re.escape(self._prefix) + r"(\d+)\.")
        by_layer: dict[int, list[str]] = {}
        rest = []
        for key, target in checkpoint_model_keys(self.model, self.files).items():
            found = pattern.match(target)
            if found is None:
                rest.append(key)
            elif int(found.group(1)) < len(self.layers):  # e.g. DeepSeek-V3's MTP layer is not part of the model
                by_layer.setdefault(int(found.group(1)), []).append(key)
        return by_layer, rest

    def _load(self, keys: list[str], what: str) -> None:
        """Read ``keys`` from their shards into the skeleton (converted, cast, on the device)."""
        from safetensors import safe_open
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils import logging as hf_logging

        from ..models.fp8_blocks import dequantizing_state

        config = LoadStateDictConfig(dtype=self.dtype, device_map={"": str(self.device)},
                                     weight_mapping=get_model_conversion_mapping(self.model))
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        # shards are opened per load and closed after: mapped pages of layers already used must not stay resident
        scales = [self.fp8.scales[k] for k in keys if k in self.fp8.scales] if self.fp8 is not None else []
        with contextlib.ExitStack() as stack:
            handles = {name: stack.enter_context(safe_open(self.path / name, "pt"))
                       for name in sorted({self.files[k] for k in [*keys, *scales]})}
            state = dequantizing_state(keys, lambda k: handles[self.files[k]].get_slice(k), self.fp8)
            try:
                info, _ = convert_and_load_state_dict_in_model(self.model, state, config)
            finally:
                if bar:
                    hf_logging.enable_progress_bar()
            del state
        problems = [f"{k}: {v.splitlines()[-1]}" for k, v in info.conversion_errors.items()]
        problems += [f"{name} has shape {tuple(got)} on disk, the model expects {tuple(want)}"
                     for name, got, want in info.mismatched_keys]
        if problems:
            raise CdmoeError(f"cannot load {what} of {self.path}: {problems[0]}")

    # layers ------------------------------------------------------------------------------------
    def layer_keys(self, idx: int) -> list[str]:
        return self._by_layer.get(idx, [])

    def materialize(self, idx: int) -> nn.Module:
        """Load decoder layer ``idx``'s weights (idempotent while resident)."""
        layer = self.layers[idx]
        if self._refs.get(idx, 0) == 0:
            self._load(self.layer_keys(idx), what=f"decoder layer {idx}")
            self.loads += 1
            missing = [n for n, t in _persistent_tensors(layer) if t.device.type == "meta"]
            if missing:
                raise CdmoeError(f"{self.path} has no tensor for {self._prefix}{idx}.{missing[0]}; is it complete?")
            if idx in self._condensed:
                self._swap_in(idx)
        self._refs[idx] = self._refs.get(idx, 0) + 1
        return layer

    def release(self, idx: int) -> None:
        """Drop decoder layer ``idx``'s weights once nobody holds it (back to the meta device)."""
        self._refs[idx] -= 1
        if self._refs[idx]:
            return
        layer = self.layers[idx]
        if idx in self._originals:
            setattr(layer, self.spec.block_attr, self._originals.pop(idx))
        for name, _ in _persistent_tensors(layer):
            _set_tensor(layer, name, None)

    @contextlib.contextmanager
    def resident(self, idx: int) -> Iterator[nn.Module]:
        layer = self.materialize(idx)
        try:
            yield layer
        finally:
            self.release(idx)

    # condensed set (Algorithm 2, writing) ------------------------------------------------------
    def candidate(self, block: MoEBlock, experts: tuple[int, ...], gates: tuple[float, ...]):
        """What ``set_condensed`` takes: only the choice; the fused MLP is built when the layer loads."""
        return (tuple(experts), tuple(gates))

    def set_condensed(self, idx: int, candidate) -> None:
        if candidate is None:
            self._condensed.pop(idx, None)
        else:
            self._condensed[idx] = candidate
        if self._refs.get(idx, 0):  # already resident: swap now
            if idx in self._originals:
                setattr(self.layers[idx], self.spec.block_attr, self._originals.pop(idx))
            if candidate is not None:
                self._swap_in(idx)

    def _swap_in(self, idx: int) -> None:
        from ..models.condensed import fuse_condensed_mlp

        layer = self.layers[idx]
        original = getattr(layer, self.spec.block_attr)
        experts, gates = self._condensed[idx]
        fused = fuse_condensed_mlp(MoEBlock(idx, original, self.spec, self.model.config), experts, gates)
        self._originals[idx] = original
        setattr(layer, self.spec.block_attr, fused)


def _block_fp8(path: Path):
    from ..models.fp8_blocks import block_fp8
    from ..models.input_checks import read_config

    return block_fp8(path, read_config(path))


def _persistent_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers of ``module`` (what a checkpoint stores)."""
    out = list(module.named_parameters())
    for mod_name, mod in module.named_modules():
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and name not in mod._non_persistent_buffers_set:
                out.append((f"{mod_name}.{name}" if mod_name else name, buf))
    return out


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    """Set parameter/buffer ``name`` of ``module`` to ``value`` (None: an empty tensor on the meta device)."""
    from accelerate.utils import set_module_tensor_to_device

    if value is None:
        set_module_tensor_to_device(module, name, "meta")
    else:
        owner, _, leaf = name.rpartition(".")
        parent = attr_path(module, owner) if owner else module
        if leaf in parent._buffers:
            parent._buffers[leaf] = value
        else:
            set_module_tensor_to_device(module, name, value.device, value=value)
