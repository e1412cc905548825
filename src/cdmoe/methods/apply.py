"""``cdmoe apply``: replay the choices of an earlier ``cdmoe.json`` on the model it was made from (condensed layers,
or every layer's action of a budget plan)."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint.record import check_record_matches, choices_from_record, condense_layers, read_record
from ..checkpoint.writer import check_output_dir, save
from ..models.input_checks import check_inputs
from ..models.loading import load_model
from ..models.placement import resolve_device
from ..models.storage_dtypes import plan_of
from ..errors import CdmoeError
from .baselines import finish_quantized
from .budget_plan import plan_from_record, replay_budget_plan
from .compressed import SCHEMES
from .quantize import check_quantize

__all__ = ["apply_record", "replayed_scheme"]


def replayed_scheme(record: dict, where) -> str | None:
    """The compressed-tensors scheme a record's output was quantised with (replayed by ``cdmoe apply``), None
    when it was not quantised; a bitsandbytes one is refused in one line (its codes are not reproducible here)."""
    entry = record.get("quantization")
    if not entry:
        return None
    if entry.get("library") == "compressed-tensors" and entry.get("scheme") in SCHEMES:
        return entry["scheme"]
    raise CdmoeError(f"{where} was quantised with {entry.get('library', 'an unknown library')}, which cdmoe apply "
                     "does not replay; apply it without its 'quantization' entry, then quantise the output")


def apply_record(model: str | Path, record: str | Path, out: str | Path, *, dtype: str = "auto", force: bool = False,
                 device: str = "auto") -> Path:
    """Replay the choices of an earlier ``cdmoe.json`` on ``model`` (computed on ``device``) and save to ``out``."""
    resolve_device(device)
    budget = read_record(record).get("method") == "budget"  # a budget plan: every layer's action replayed
    data = read_record(record, condensed=not budget)
    if budget:
        plan_from_record(data, record)  # a malformed plan is refused before the model loads
    scheme = replayed_scheme(data, record)
    check_quantize(scheme, model=model)
    check_inputs(model)
    check_output_dir(out, force, (model, record))
    loaded = load_model(model, dtype=dtype, device=device)
    check_record_matches(data, loaded, model)
    if budget:
        new_record = replay_budget_plan(loaded, data, record, model)
    else:
        new_record = condense_layers(loaded, choices_from_record(data), base_model=str(model), search=data.get("search"))
    storage = plan_of(loaded, model, dtype)
    if scheme:  # the record's compressed-tensors scheme, as it was written (w4a16: its group size)
        group = data["quantization"].get("weights", {}).get("group_size")
        loaded, new_record["quantization"] = finish_quantized(loaded, scheme, storage, group)
    return save(loaded, out, new_record, source=model, force=force, storage=storage, inputs=(model, record))
