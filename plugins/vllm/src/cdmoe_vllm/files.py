"""Check a local condensed directory's weight files when vLLM reads its config (front-end process).

vLLM opens the weights only in its engine's worker process; a missing shard or a truncated
file fails there, and with vLLM's default multi-process engine the user reads "Engine core
initialization failed" with the cause in the worker's log. So the files are checked here, while
the config is read, from the safetensors *headers* only (no tensor is read: cheap at any size):

* with ``model.safetensors.index.json``: every shard it names exists, and holds the tensors the
  index puts in it; without: there is at least one ``*.safetensors`` (what vLLM loads);
* every file is a complete safetensors file (its header parses and its tensors' bytes are there);
* each condensed layer's tensors (``gate_proj``/``up_proj`` (I, H), ``down_proj`` (H, I), and
  ``shared_gate`` (1, H) with a gated width) exist with the shapes the ``cdmoe`` entry gives, and each
  pruned layer's router and fused experts have its own expert count as their first axis;
* every decoder layer has the tensors its siblings have: the same attention and norms as every
  layer, the same block tensors as every layer of its kind (dense, MoE, condensed, dropped): cdmoe
  writes all layers of a kind alike, so a tensor that the others have and one lacks is missing.

The rest (a tensor no layer has, the embeddings, the final norm) is checked after loading, from the
values (:mod:`cdmoe_vllm.loaded`), which needs no list of the family's names.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from safetensors import safe_open

from .errors import RECOPY, malformed
from .quant import scheme_of

__all__ = ["INDEX", "check_files"]

INDEX = "model.safetensors.index.json"


def _shards(model_dir: Path, where: str) -> tuple[list[str], dict | None]:
    """The weight files vLLM will open, and the index's tensor -> file map (None without an index)."""
    index = model_dir / INDEX
    if not index.is_file():
        shards = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not shards:
            raise malformed("the directory has no *.safetensors weights", where, RECOPY)
        return shards, None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
        raise malformed(f"{INDEX} is not a safetensors index (no weight_map of tensor -> file)", where, RECOPY) from None
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (model_dir / s).is_file()]
    if missing:
        raise malformed(f"{missing[0]}, named in {INDEX}, is missing ({len(missing)} of {len(shards)} files missing)",
                        where, RECOPY)
    return shards, weight_map


def _headers(model_dir: Path, shards: list[str], where: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (file, shape), from the headers; a file that does not parse is refused."""
    tensors = {}
    for shard in shards:
        try:
            with safe_open(model_dir / shard, framework="pt") as f:
                for name in f.keys():
                    tensors[name] = (shard, tuple(f.get_slice(name).get_shape()))
        except Exception as exc:  # safetensors_rust.SafetensorError (not importable by name), OSError
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise malformed(f"{shard} is not a complete safetensors file ({reason})", where, RECOPY) from None
    return tensors


def _condensed_tensors(data: dict, spec: dict, kept: list[int]) -> dict[str, tuple[str, tuple[int, int]]]:
    """Checkpoint name -> (which layer, shape) of every condensed layer's tensors (names as saved:
    Block Drop checkpoints are numbered by the kept stack). A w4a16 checkpoint stores the projections
    as ``weight_packed`` (rows, columns * 4 / 32), eight int4 codes per int32."""
    hidden, layers, block = data["hidden_size"], spec.get("layers_path", "model.layers"), spec.get("block_attr", "mlp")
    packed = scheme_of(data.get("quantization_config") or {}) == "w4a16"
    expected = {}
    for key, layer in spec.get("condensed_layers", {}).items():
        if int(key) not in kept:  # its block was dropped too: nothing of it is built
            continue
        prefix, width = f"{layers}.{kept.index(int(key))}.{block}", layer["intermediate_size"]
        shapes = {"gate_proj": (width, hidden), "up_proj": (width, hidden), "down_proj": (hidden, width)}
        if layer.get("gated_width", 0):
            shapes["shared_gate"] = (1, hidden)
        for name, (rows, cols) in shapes.items():
            stored = ("weight_packed", (rows, -(-cols * 4 // 32))) if packed and name != "shared_gate" else \
                ("weight", (rows, cols))
            expected[f"{prefix}.{name}.{stored[0]}"] = (f"condensed layer {key}", stored[1])
    return expected


def _pruned_tensors(spec: dict, kept: list[int]) -> dict[str, tuple[str, int]]:
    """Checkpoint name -> (which layer, expert count) of every pruned layer's router and fused experts,
    whose first axis must be the layer's own expert count."""
    layers, block = spec.get("layers_path", "model.layers"), spec.get("block_attr", "mlp")
    router, experts = spec.get("router_attr", "gate"), spec.get("experts_attr", "experts")
    expected = {}
    for key, entry in spec.get("pruned_experts", {}).items():
        if int(key) in kept:
            prefix = f"{layers}.{kept.index(int(key))}.{block}"
            for name in (f"{router}.weight", f"{experts}.gate_up_proj", f"{experts}.down_proj"):
                expected[f"{prefix}.{name}"] = (f"pruned layer {key}", entry["num_experts"])
    return expected


def _missing_from_layer(names, spec: dict, kinds: list[str]) -> str | None:
    """The first tensor one decoder layer lacks that its siblings have (see the module docstring), or None.
    ``kinds[j]``: the kind of saved layer j; layers beyond them (DeepSeek-V3's MTP layer) are not looked at."""
    layers, block = spec.get("layers_path", "model.layers"), spec.get("block_attr", "mlp")
    pattern = re.compile(rf"^{re.escape(layers)}\.(\d+)\.(.+)$")
    held = defaultdict(set)  # saved layer -> its names below the layer
    for name in names:
        match = pattern.match(name)
        if match and int(match[1]) < len(kinds):
            held[int(match[1])].add(match[2])
    groups = defaultdict(set)  # what some layer of a kind has: the non-block part is common to all kinds
    for j, rest in held.items():
        for name in rest:
            groups["all" if not name.startswith(f"{block}.") else kinds[j]].add(name)
    for j, kind in enumerate(kinds):
        lacking = sorted((groups["all"] | groups[kind]) - held[j])
        if lacking:
            return f"{layers}.{j}.{lacking[0]}"
    return None


def check_files(model_dir: Path, data: dict, spec: dict, kept: list[int], kinds: list[str]) -> None:
    """Raise :class:`~cdmoe_vllm.errors.CdmoeVllmError` (one line) if ``model_dir`` cannot load as ``data``
    (its config.json, with the ``cdmoe`` entry ``spec``) says; ``kept``: original index of each saved layer,
    ``kinds``: "dense", "moe", "condensed" or "dropped" for each."""
    where = str(model_dir)
    shards, weight_map = _shards(model_dir, where)
    tensors = _headers(model_dir, shards, where)
    for name, shard in (weight_map or {}).items():
        if tensors.get(name, (None,))[0] != shard:
            raise malformed(f"{name} is not in {shard}, where {INDEX} puts it", where, RECOPY)
    for name, (layer, shape) in _condensed_tensors(data, spec, kept).items():
        if name not in tensors:
            raise malformed(f"tensor {name} ({layer}) is missing from the checkpoint", where)
        if tensors[name][1] != shape:
            raise malformed(f"{name} has shape {tensors[name][1]}, {layer} needs {shape}", where)
    for name, (layer, count) in _pruned_tensors(spec, kept).items():
        if name in tensors and tensors[name][1][0] != count:
            raise malformed(f"{name} has shape {tensors[name][1]}, {layer} keeps {count} experts", where)
    lacking = _missing_from_layer(tensors, spec, kinds)
    if lacking:
        raise malformed(f"tensor {lacking} is missing from the checkpoint (the other layers of its kind have "
                        "theirs)", where, RECOPY)
