"""Check the ``cdmoe`` entry of a condensed ``config.json`` before anything is built from it.

The entry (format: cdmoe's ``modeling_cdmoe.py``) is trusted by the model classes: layer indices
pick which vLLM block is built where, widths size the condensed MLPs. So every key the plugin
reads is checked here for its type and range, with one line naming the key; what is well formed
but not servable (family, quantisation, merged experts); ``pruned_experts`` (the budget planner's layers
with their own expert counts) is checked here too is refused in :mod:`cdmoe_vllm.config`.
"""

from __future__ import annotations

from .errors import malformed

__all__ = ["FORMAT_VERSION", "check_spec"]

FORMAT_VERSION = 1
_KINDS = {str: "a string", type(None): "null", list: "a list", dict: "an object", bool: "a boolean", int: "a number",
          float: "a number"}


def _kind(value) -> str:
    return _KINDS.get(type(value), type(value).__name__)


def _is_count(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _layer(key, num_layers: int) -> int | None:
    """``key`` (an index, or its decimal string as JSON object keys are) as a layer index, else None."""
    text = str(key)
    index = int(text) if text.isdigit() and not isinstance(key, bool) else None
    return index if index is not None and index < num_layers else None


def _per_layer(spec: dict, key: str, what: str, num_layers: int, where: str | None) -> dict:
    """``spec[key]``, an object whose keys are layers (``condensed_layers``, ``pruned_experts``), checked."""
    entries = spec.get(key, {})
    if not isinstance(entries, dict):
        raise malformed(f"{key} is {_kind(entries)}, not an object", where)
    for layer in entries:
        if _layer(layer, num_layers) is None:
            shown = layer if str(layer).isdigit() else repr(layer)
            raise malformed(f"{what} layer {shown} is not a layer (the model has {num_layers})", where)
    return entries


def check_spec(data: dict, where: str | None) -> dict:
    """The ``cdmoe`` entry of ``data`` (a config.json), checked; raises :class:`CdmoeVllmError`."""
    if "cdmoe" not in data:
        raise malformed("config.json has model_type 'cdmoe' but no 'cdmoe' entry", where)
    spec = data["cdmoe"]
    if not isinstance(spec, dict):
        raise malformed(f"the 'cdmoe' entry is {_kind(spec)}, not an object", where)
    if "format_version" not in spec:
        raise malformed("the 'cdmoe' entry has no format_version", where)
    if spec["format_version"] != FORMAT_VERSION:
        raise malformed(f"cdmoe format_version {spec['format_version']!r} is not {FORMAT_VERSION}, the one this "
                        "plugin reads", where, fix="install the vLLM plugin of the cdmoe version that wrote it")
    if "base_model_type" not in spec:
        raise malformed("the 'cdmoe' entry has no base_model_type (the family it was condensed from)", where)
    if not isinstance(spec["base_model_type"], str):
        raise malformed(f"base_model_type is {spec['base_model_type']!r}, not a family name", where)
    num_layers = data.get("num_hidden_layers")
    if not _is_count(num_layers, 1):
        raise malformed(f"num_hidden_layers is {num_layers!r}, not a positive integer", where)
    condensed = _per_layer(spec, "condensed_layers", "condensed", num_layers, where)
    for key, layer in condensed.items():
        if not isinstance(layer, dict):
            raise malformed(f"condensed layer {key} is {_kind(layer)}, not an object", where)
        width, gated = layer.get("intermediate_size"), layer.get("gated_width", 0)
        if not _is_count(width, 1):
            raise malformed(f"condensed layer {key}: intermediate_size is {width!r}, not a positive integer", where)
        if not (_is_count(gated, 0) and gated <= width):
            raise malformed(f"condensed layer {key}: gated_width is {gated!r}, not an integer in [0, {width}]", where)
    pruned = _per_layer(spec, "pruned_experts", "pruned", num_layers, where)
    for key, entry in pruned.items():
        count = entry.get("num_experts") if isinstance(entry, dict) else None
        if not _is_count(count, 1):
            raise malformed(f"pruned layer {key}: num_experts is {count!r}, not a positive integer", where)
    lists = {}
    for key in ("dropped_layers", "dropped_blocks"):
        value = spec.get(key, [])
        if not isinstance(value, list):
            raise malformed(f"{key} is {_kind(value)}, not a list", where)
        bad = [i for i in value if _layer(i, num_layers) is None or not isinstance(i, int)]
        if bad or len(set(value)) != len(value):
            raise malformed(f"{key} {value} is not a list of distinct layers of the {num_layers}", where)
        lists[key] = set(value)
    kinds = {"condensed": {int(k) for k in condensed}, "dropped": lists["dropped_layers"],
             "pruned": {int(k) for k in pruned}}
    for a, b in (("condensed", "dropped"), ("pruned", "condensed"), ("pruned", "dropped")):
        both = sorted(kinds[a] & kinds[b])
        if both:
            raise malformed(f"layer {both[0]} is both {a} and {b}", where)
    if len(lists["dropped_blocks"]) == num_layers:
        raise malformed("dropped_blocks drops every layer", where)
    return spec
