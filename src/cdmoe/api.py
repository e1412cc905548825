"""Python API; each function mirrors a ``cdmoe`` command.

    import cdmoe
    model = cdmoe.load_model("path/to/moe")
    record = cdmoe.condense_layers(model, [cdmoe.LayerChoice(layer=3, experts=(5, 9), gates=(0.21, 0.18))])
    cdmoe.save(model, "out/", record, source="path/to/moe")
"""

from __future__ import annotations

from pathlib import Path

from .adapter import family_spec
from .budget import model_params
from .checkpoint import check_output_dir, read_record, save_condensed
from .condensed import LayerChoice, condense_model
from .errors import CdmoeError
from .loading import load_model
from .storage_dtypes import PLAN_ATTR, attach_storage_plan, plan_of

__all__ = ["family_name", "condense_layers", "save", "apply_record", "choices_from_record"]

RECORD_FORMAT = 1


def family_name(model) -> str:
    """The model's family (``model_type``), also for a cdmoe-format model."""
    cdmoe = getattr(model.config, "cdmoe", None)
    return cdmoe["base_model_type"] if cdmoe else model.config.model_type


def condense_layers(model, choices: list[LayerChoice], *, base_model: str | None = None, search: dict | None = None) -> dict:
    """Condense ``choices`` into ``model`` in place; return the record describing it."""
    spec = family_spec(model)
    params = model_params(model)
    if getattr(model.config, "cdmoe", None):
        raise CdmoeError("this model is already condensed; condense the original model instead")
    if getattr(model, PLAN_ATTR, None) is None:  # how it will be saved, fixed while its names are the source's
        attach_storage_plan(model, None)
    itemsize = plan_of(model).default.itemsize  # bytes as stored (the checkpoint's dtype), not as computed
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
        "search": search or {},
    }


def save(model, out: str | Path, record: dict, *, tokenizer=None, source: str | Path | None = None,
         force: bool = False, extra_files=None, storage=None, inputs=()) -> Path:
    """Write the condensed model, tokenizer, record and model card to ``out`` (atomically).

    The model is first cast in place to the dtypes it is stored in: every tensor ``source`` (the
    checkpoint it was loaded from) has keeps that checkpoint's dtype, byte for byte; new tensors
    take ``model.config.dtype`` (:mod:`cdmoe.storage_dtypes`; ``storage`` overrides).
    """
    source = source if source is not None else getattr(model.config, "_name_or_path", None) or None
    return save_condensed(model, out, record, tokenizer=tokenizer, source=source, force=force, extra_files=extra_files,
                          storage=storage, inputs=(source, *inputs))


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


def apply_record(model: str | Path, record: str | Path, out: str | Path, *, dtype: str = "auto", force: bool = False) -> Path:
    """Replay the choices of an earlier ``cdmoe.json`` on ``model`` and save to ``out``."""
    data = read_record(record, condensed=True)
    check_output_dir(out, force, (model, record))
    loaded = load_model(model, dtype=dtype)
    check_record_matches(data, loaded, model)
    new_record = condense_layers(loaded, choices_from_record(data), base_model=str(model), search=data.get("search"))
    return save(loaded, out, new_record, source=model, force=force, storage=plan_of(loaded, model, dtype),
                inputs=(model, record))
