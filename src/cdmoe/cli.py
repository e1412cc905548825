"""The ``cdmoe`` command line (typer). Each command mirrors a function of :mod:`cdmoe.api`."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import CdmoeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Condense Mixture-of-Experts models (CD-MoE).")
console = Console(stderr=True)
out_console = Console()


def _friendly(fn):
    """Turn a CdmoeError into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CdmoeError as err:
            console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _int_list(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CdmoeError(f"expected comma-separated integers, got {text!r}") from None


@app.command()
@_friendly
def plan(
    model: Annotated[str, typer.Argument(help="config.json, model directory or hub id")],
    layers: Annotated[Optional[int], typer.Option(help="number of MoE layers to condense (default: all)")] = None,
    experts: Annotated[Optional[int], typer.Option(help="routed experts kept per layer (default: top-k)")] = None,
    shared_only: Annotated[bool, typer.Option("--shared-only", help="keep shared experts only (K=0)")] = False,
    layer_ids: Annotated[Optional[str], typer.Option(help="exact layers, e.g. 3,5,7")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="dtype for bytes (default: the config's)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
):
    """Memory of a condensing plan, from the config alone (no weights are read)."""
    from .plan import plan as run_plan

    if shared_only and experts not in (None, 0):
        raise CdmoeError("--shared-only and --experts contradict each other; pass one of them")
    result = run_plan(model, layers, 0 if shared_only else experts, _int_list(layer_ids), dtype)
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"cdmoe plan: {result['model']}", show_header=True)
    table.add_column("")
    table.add_column("original", justify="right")
    table.add_column("condensed", justify="right")
    table.add_row("parameters", f"{result['total_params']:,}", f"{result['condensed_params']:,}")
    table.add_row(f"bytes ({result['dtype']})", f"{result['total_bytes'] / 2**30:.2f} GiB",
                  f"{result['condensed_bytes'] / 2**30:.2f} GiB")
    table.add_row("activated params / token", f"{result['active_params']:,}", f"{result['condensed_active_params']:,}")
    table.add_row("memory ratio", "100%", f"{100 * result['memory_ratio']:.1f}%")
    out_console.print(table)
    out_console.print(
        f"{len(result['condensed_layers'])} of {result['moe_layers']} MoE layers condensed "
        f"({result['condensed_layers']}), routed experts kept per layer: {result['experts_kept']} of "
        f"{result['routed_experts']} (top-k {result['top_k']}); counted from a {result['counted']}."
    )


@app.command()
@_friendly
def apply(
    model: Annotated[str, typer.Argument(help="model directory or hub id")],
    record: Annotated[Path, typer.Argument(help="a cdmoe.json record (or an output directory holding one)")],
    out: Annotated[Path, typer.Option(help="output directory")],
    dtype: Annotated[str, typer.Option(help="auto, bf16, fp16 or fp32")] = "auto",
    force: Annotated[bool, typer.Option(help="replace --out if it exists")] = False,
):
    """Apply the layers/experts/gates of an earlier record to a model and save it (no search)."""
    from .api import apply_record

    result = apply_record(model, record, out, dtype=dtype, force=force)
    out_console.print(f"wrote {result}")


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
