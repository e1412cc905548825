"""``cdmoe apply``: replay the choices of an earlier ``cdmoe.json`` on the model it was made from."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint.record import check_record_matches, choices_from_record, condense_layers, read_record
from ..checkpoint.writer import check_output_dir, save
from ..models.input_checks import check_inputs
from ..models.loading import load_model
from ..models.placement import resolve_device
from ..models.storage_dtypes import plan_of

__all__ = ["apply_record"]


def apply_record(model: str | Path, record: str | Path, out: str | Path, *, dtype: str = "auto", force: bool = False,
                 device: str = "auto") -> Path:
    """Replay the choices of an earlier ``cdmoe.json`` on ``model`` (computed on ``device``) and save to ``out``."""
    resolve_device(device)
    data = read_record(record, condensed=True)
    check_inputs(model)
    check_output_dir(out, force, (model, record))
    loaded = load_model(model, dtype=dtype, device=device)
    check_record_matches(data, loaded, model)
    new_record = condense_layers(loaded, choices_from_record(data), base_model=str(model), search=data.get("search"))
    return save(loaded, out, new_record, source=model, force=force, storage=plan_of(loaded, model, dtype),
                inputs=(model, record))
