"""``cdmoe plan MODEL --budget 0.6``: what a memory budget means in bytes, from the config alone.

The model is built on the meta device; every tensor's stored dtype comes from the source's safetensors
headers when the directory has them, else from the config (or ``--dtype``). The bytes are
:class:`~cdmoe.models.byte_budget.ByteTable`'s: what the budget planner (``cdmoe condense --budget``)
counts, tensors exactly plus a bound on the safetensors headers.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CdmoeError
from .adapter import moe_blocks
from .byte_budget import ByteTable
from .mixed import KEEP, LayerAction, prune_sizes
from .plan import load_config, meta_model
from .storage_dtypes import storage_plan

__all__ = ["PRUNE_FRACTIONS", "budget_bytes"]

PRUNE_FRACTIONS = (0.75, 0.5, 0.25)


def budget_bytes(model_or_config: str | Path, dtype: str | None = None, quantize: str | None = None) -> dict:
    """Predicted bytes of the original, of what no plan changes (``fixed``), of every action of each MoE layer
    (keep, prune levels, condense K = top-k..K_min, drop) and of the smallest plan (``floor``); with
    ``quantize`` (w8a8 | w4a16 | fp8) all but the original's are the bytes once quantised by that scheme."""
    config = load_config(model_or_config)
    if isinstance(config, dict):
        raise CdmoeError(f"{model_or_config} needs its family's modelling code to count bytes; pass "
                         "--trust-remote-code with a model directory that ships it")
    model = meta_model(config)
    source = Path(str(model_or_config))
    storage = storage_plan(model, source if source.is_dir() else None, dtype or "auto")
    plain = ByteTable(model, storage)
    table = plain if quantize is None else ByteTable(model, storage, quantize)
    layers = {}
    for block in moe_blocks(model):
        sizes, why = prune_sizes(block, PRUNE_FRACTIONS)
        actions = [KEEP] + [LayerAction("prune", tuple(range(s))) for s in sizes]
        k_min = 0 if block.shared is not None else 1
        actions += [LayerAction("condense", tuple(range(k)), (1.0,) * k) for k in range(block.top_k, k_min - 1, -1)]
        layers[block.layer_idx] = {"actions": {a.label: table.action(block.layer_idx, a)
                                               for a in actions + [LayerAction("drop")]}, "note": why}
    drop_all = {layer: LayerAction("drop") for layer in layers}
    return {"model": str(model_or_config), "original_bytes": plain.total({}), "quantize": quantize, "fixed_bytes": table.fixed,
            "floor_bytes": table.total(drop_all), "layers": layers,
            "default_dtype": str(table.storage.default).removeprefix("torch.")}
