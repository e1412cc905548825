"""The record of a condensed model (``cdmoe.json``): condensing choices into a model, describing them, reading
a record back and checking it against a model.

    import cdmoe
    model = cdmoe.load_model("path/to/moe")
    record = cdmoe.condense_layers(model, [cdmoe.LayerChoice(layer=3, experts=(5, 9), gates=(0.21, 0.18))])
    cdmoe.save(model, "out/", record, source="path/to/moe")
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel

from ..errors import CdmoeError
from ..models.adapter import family_spec
from ..models.budget import model_params
from ..models.condensed import LayerChoice, condense_model
from ..models.storage_dtypes import PLAN_ATTR, attach_storage_plan, plan_of

__all__ = ["RECORD_FORMAT", "RECORD_NAME", "check_record_matches", "choices_from_record", "condense_layers",
           "family_name", "read_record"]

RECORD_NAME = "cdmoe.json"
RECORD_FORMAT = 1


def family_name(model) -> str:
    """The model's family (``model_type``), also for a cdmoe-format model."""
    cdmoe = getattr(model.config, "cdmoe", None)
    return cdmoe["base_model_type"] if cdmoe else model.config.model_type


def condense_layers(model: PreTrainedModel, choices: list[LayerChoice], *, base_model: str | None = None,
                    search: dict | None = None) -> dict:
    """Condense ``choices`` into ``model`` in place; return the record describing it."""
    spec = family_spec(model)
    params = model_params(model)
    if getattr(model.config, "cdmoe", None):
        raise CdmoeError("this model is already condensed; condense the original model instead")
    if getattr(model, PLAN_ATTR, None) is None:  # how it will be saved, fixed while its names are the source's
        attach_storage_plan(model, None)
    plan = plan_of(model)
    itemsize = plan.default.itemsize  # bytes as stored (the checkpoint's dtype), not as computed
    condense_model(model, choices)
    summary = params.summary({c.layer: len(c.experts) for c in choices}, bytes_per_param=itemsize)
    return {
        "format_version": RECORD_FORMAT,
        "method": "cd-moe",
        "base_model": base_model or getattr(model.config, "_name_or_path", None) or "unknown",
        "family": family_name(model),
        "family_spec": spec.name,
        "native_format": not hasattr(model.config, "cdmoe"),
        "condensed": [
            {"layer": c.layer, "experts": list(c.experts), "gates": list(c.gates), **c.extra}
            for c in sorted(choices, key=lambda c: c.layer)
        ],
        "params": summary,
        **plan.record(),  # a quantised source: what the output keeps of it
        "search": search or {},
    }


def choices_from_record(record: dict) -> list[LayerChoice]:
    return [LayerChoice(layer=int(c["layer"]), experts=tuple(c["experts"]), gates=tuple(c["gates"]))
            for c in record["condensed"]]


def check_record_matches(record: dict, model, name) -> None:
    """Refuse a record made for another model: other family or other parameter count (shapes)."""
    family, total = record.get("family"), (record.get("params") or {}).get("total_params")
    if family is not None and family != family_name(model):
        raise CdmoeError(f"the record was made for a {family!r} model and {name} is {family_name(model)!r}; pass the "
                         f"model the record was made from ({record.get('base_model', 'see its base_model')})")
    has = model_params(model).total if total is not None else None
    if total is not None and total != has:
        raise CdmoeError(f"the record was made for a model of {total:,} parameters and {name} has "
                         f"{has:,}; pass the model the record was made from "
                         f"({record.get('base_model', 'see its base_model')})")


def read_record(directory: str | Path, condensed: bool = False) -> dict:
    """The ``cdmoe.json`` of an output directory (or that file itself), checked: a JSON object and,
    with ``condensed``, a ``condensed`` list of {layer, experts, gates} with finite gates."""
    import math

    path = Path(directory)
    path = path / RECORD_NAME if path.is_dir() or not path.suffix else path
    if not path.exists():
        raise CdmoeError(f"{path.parent if path.name == RECORD_NAME else path} has no {RECORD_NAME}; pass a cdmoe "
                         "output directory or its cdmoe.json")
    from ..models.input_checks import read_json_object

    record = read_json_object(path, "pass the cdmoe.json a cdmoe run wrote")
    if not condensed:
        return record
    entries = record.get("condensed")
    if not isinstance(entries, list) or not entries:
        raise CdmoeError(f"{path} has no 'condensed' list of layers; it is not the record of a CD-MoE output")
    for entry in entries:
        ok = (isinstance(entry, dict) and isinstance(entry.get("layer"), int) and isinstance(entry.get("experts"), list)
              and isinstance(entry.get("gates"), list) and len(entry["experts"]) == len(entry["gates"])
              and all(isinstance(e, int) for e in entry["experts"]))
        if not ok:
            raise CdmoeError(f"{path}: condensed entry {entry!r:.80} needs an integer 'layer' and equally long "
                             "'experts' (integers) and 'gates' lists")
        bad = [g for g in entry["gates"] if not isinstance(g, (int, float)) or not math.isfinite(g)]
        if bad:
            raise CdmoeError(f"{path}: layer {entry['layer']} has gate {bad[0]!r}; gates must be finite numbers "
                             "(rerun the search that wrote this record)")
    return record
