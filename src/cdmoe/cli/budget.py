"""``cdmoe plan --budget``: what a memory budget means in bytes (the planner itself: ``cdmoe condense --budget``)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from ..errors import CdmoeError
from .options import out_console
from .summary import size_text

__all__ = ["print_budget_plan"]



def print_budget_plan(model: str, budgets: list[float], dtype: str | None, as_json: bool,
                      quantize: str | None = None) -> None:
    """``cdmoe plan --budget``: the bytes a budget allows and what each action of a MoE layer weighs
    (``quantize``: in that compressed-tensors scheme's bytes)."""
    from ..evaluation.measure import disk_bytes
    from ..methods.budget_plan import check_budget_quantize
    from ..models.plan_budget import budget_bytes

    if not budgets or not all(0 < b <= 1 for b in budgets):
        raise CdmoeError(f"--budget takes ratios of the original weight bytes in (0, 1], got {budgets}")
    check_budget_quantize(quantize)
    result = budget_bytes(model, dtype, quantize)
    local = Path(model).is_dir() and any(Path(model).glob("*.safetensors"))
    original = disk_bytes(model) if local else result["original_bytes"]
    result.update(measured=local, original_bytes=original,
                  budgets={str(b): {"budget_bytes": int(b * original), "remove_bytes": original - int(b * original),
                                    "reachable": int(b * original) >= result["floor_bytes"]} for b in budgets})
    if as_json:
        print(json.dumps(result))
        return
    how = "measured on disk" if local else f"predicted from the config ({result['default_dtype']})"
    out_console.print(f"original weight bytes: {size_text(original)} ({how}); no plan changes "
                      f"{size_text(result['fixed_bytes'])} (embeddings, attention, norms, dense layers, headers); "
                      f"the smallest plan (every MoE sub-layer dropped) is {size_text(result['floor_bytes'])} "
                      f"({100 * result['floor_bytes'] / original:.1f}%)")
    for b, entry in result["budgets"].items():
        out_console.print(f"budget {100 * float(b):g}%: at most {size_text(entry['budget_bytes'])}, remove at least "
                          f"{size_text(entry['remove_bytes'])}" + ("" if entry["reachable"] else " (not reachable)"))
    layers = result["layers"]
    first = next(iter(layers.values()))
    stored = f"bytes once quantised ({quantize})" if quantize else "bytes as stored"
    table = Table(title=f"one MoE layer's actions ({len(layers)} MoE layers; {stored})", show_header=True)
    table.add_column("action")
    table.add_column("bytes", justify="right")
    table.add_column("saves", justify="right")
    keep = first["actions"]["keep"]
    for label, size in first["actions"].items():
        table.add_row(label, f"{size_text(size)}", f"{size_text((keep - size))}")
    out_console.print(table)
    if first["note"]:
        out_console.print(f"prune levels: {first['note']}")
