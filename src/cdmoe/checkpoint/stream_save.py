"""Writing a condensed checkpoint one decoder layer at a time (sequential mode).

The whole condensed model is never in memory. The output has the same tensors, names,
config and code files as :func:`cdmoe.checkpoint.writer.save_condensed` writes for the same
choices, only split into shards: one per decoder layer, plus one for the rest, with a
``model.safetensors.index.json``::

    model-00001-of-000{L+1}.safetensors   decoder layer 0 (condensed if chosen)
    ...
    model-000{L+1}-of-000{L+1}.safetensors   embeddings, final norm, lm_head (tied ones once)

How: a second meta-device skeleton is condensed with :func:`cdmoe.checkpoint.record.condense_layers`
(record, parameter counts, the condensed class and config, exactly as whole mode), and its
own ``save_pretrained`` writes config.json, generation_config.json, the modelling code and
the non-layer tensors. Each decoder layer is then loaded by the
:class:`~cdmoe.memory.layer_store.SequentialStore` with the chosen layers' fused MLP swapped in
(fused in the compute dtype, then each tensor cast to its stored dtype, as whole mode rounds), and its
tensors are written to its own shard.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..memory.layer_store import INDEX_NAME, SINGLE_NAME, SequentialStore
from ..models.condensed import LayerChoice
from .fp8_output import encode_fp8, family_layout, fp8_config, new_names_in_source_layout

__all__ = ["condensed_skeleton", "meta_copy", "write_streamed"]


def meta_copy(store: SequentialStore):
    """A meta-device copy of ``store``'s model (tied, named and with the generation config of the source)."""
    from accelerate import init_empty_weights
    from transformers import GenerationConfig

    config = store.model.config
    with init_empty_weights():  # the store's own class: a condensed directory's config class is not an Auto one
        skeleton = type(store.model)._from_config(config, dtype=store.dtype)
    skeleton.tie_weights()  # meta parameters are not tied by from_config; parameter counts need it
    skeleton.config._name_or_path = config._name_or_path
    if (store.path / "generation_config.json").exists():  # what from_pretrained would have loaded
        skeleton.generation_config = GenerationConfig.from_pretrained(store.path)
    return skeleton


def condensed_skeleton(store: SequentialStore, choices: list[LayerChoice], base_model: str, search: dict):
    """A meta-device copy of ``store``'s model with ``choices`` condensed, and its record."""
    from .record import condense_layers

    skeleton = meta_copy(store)
    record = condense_layers(skeleton, choices, base_model=base_model, search=search)
    return skeleton, record


@torch.no_grad()
def write_streamed(store: SequentialStore, skeleton, swaps: dict[int, object], directory: Path, storage,
                   layer_tensors=None) -> None:
    """Write the condensed checkpoint into ``directory``, layer by layer, each tensor in the dtype
    ``storage`` (a :class:`~cdmoe.models.storage_dtypes.StoragePlan`) gives its name. ``swaps``: {layer:
    what ``store.set_condensed`` takes}, e.g. a choice's (experts, gates) or a builder of its new block.
    ``layer_tensors(idx, layer)``: instead, the tensors to write for decoder layer ``idx`` (full names), e.g. a
    quantised copy's (:mod:`cdmoe.methods.compressed_stream`); ``skeleton`` then has its structure and config."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers.core_model_loading import revert_weight_conversion

    prefix = store.spec.layers_path
    n = len(store.layers)
    shard = "model-{:05d}-of-{:05d}.safetensors"
    skeleton.to(storage.default)
    cast: dict[tuple, torch.Tensor] = {}  # tied tensors (embeddings / lm_head) must stay one tensor after the cast
    rest = {k: cast.setdefault((v.data_ptr(), v.shape), v.to(storage.dtype_for(k, v)))
            for k, v in store.model.state_dict().items() if not k.startswith(prefix + ".")}
    fp8 = storage.fp8 is not None  # an FP8 output (fp8_output.py): the source's layout, fp8 weights encoded
    new = new_names_in_source_layout(skeleton, storage) if fp8 else set()
    if fp8:
        rest = encode_fp8(rest, storage, new)
    # save_pretrained writes config, generation config and code, and the non-layer tensors as model.safetensors
    with fp8_config(skeleton, storage):
        skeleton.save_pretrained(directory, state_dict=rest, max_shard_size="10000GB")
    rest_bytes = {k: v.numel() * v.element_size() for k, v in rest.items()}
    del rest, cast  # written: the layers must not wait beside a second copy of the embeddings
    rest_file = shard.format(n + 1, n + 1)
    (directory / SINGLE_NAME).rename(directory / rest_file)
    with_original_keys = getattr(skeleton.config, "cdmoe", None) is None  # native format: per-expert keys, as saved whole
    weight_map, total = {}, 0
    for idx in range(n):
        store.set_condensed(idx, None)
    for layer, swap in swaps.items():
        store.set_condensed(layer, swap)
    try:
        for idx in range(n):
            with store.resident(idx) as layer:
                tensors = layer_tensors(idx, layer) if layer_tensors is not None else {
                    name: v.to(storage.dtype_for(name, v)).contiguous()
                    for name, v in ((f"{prefix}.{idx}.{k}", v) for k, v in layer.state_dict().items())}
            if fp8:
                tensors = encode_fp8(family_layout(skeleton, tensors), storage, new)
            elif with_original_keys:
                tensors = revert_weight_conversion(skeleton, tensors)
            save_file(tensors, directory / shard.format(idx + 1, n + 1), metadata={"format": "pt"})
            weight_map.update({k: shard.format(idx + 1, n + 1) for k in tensors})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
    finally:
        for layer in swaps:
            store.set_condensed(layer, None)
    with safe_open(directory / rest_file, "pt") as f:
        for key in f.keys():
            weight_map[key] = rest_file
            if key not in rest_bytes:
                tensor = f.get_tensor(key)
                rest_bytes[key] = tensor.numel() * tensor.element_size()
            total += rest_bytes[key]
    index = {"metadata": {"total_parameters": skeleton.num_parameters(), "total_size": total},
             "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

