"""``cdmoe plan``: parameters of a condensing plan, and the memory and disk the ``condense`` run would need."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .options import (
    Activations,
    Device,
    Experts,
    Final,
    Metric,
    Mode,
    Samples,
    SeqLen,
    SharedOnly,
    TrustCode,
    _experts,
    _float_list,
    _friendly,
    _int_list,
    out_console,
)

GiB = 2**30


@_friendly
def plan(
    model: Annotated[str, typer.Argument(help="config.json, model directory or hub id")],
    layers: Annotated[Optional[int], typer.Option(help="number of MoE layers to condense (default: all)")] = None,
    experts: Experts = None,
    shared_only: SharedOnly = False,
    layer_ids: Annotated[Optional[str], typer.Option(help="exact layers, e.g. 3,5,7")] = None,
    dtype: Annotated[
        Optional[str], typer.Option(help="dtype of the bytes and of the compute (default: the config's; fp32 on a CPU)")
    ] = None,
    device: Device = "auto",
    mode: Mode = "auto",
    samples: Samples = 100,
    seq_len: SeqLen = 512,
    batch_size: Annotated[int, typer.Option(help="calibration batch size")] = 8,
    activations: Activations = "auto",
    final: Final = "hidden",
    metric: Metric = "js",
    out: Annotated[Path, typer.Option(help="where condense would write (for the free disk)")] = Path("."),
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    budget: Annotated[Optional[str], typer.Option(help="what budgets mean in bytes, e.g. 0.8,0.6 (ratios of the "
                                                       "weight bytes; see condense --budget)")] = None,
    quantize: Annotated[Optional[str], typer.Option(help="the output's --quantize: with --budget, the bytes of the plan "
                                                         "quantised by this compressed-tensors scheme (w8a8 | w4a16 | "
                                                         "fp8); else the memory of writing it quantised")] = None,
    trust_remote_code: TrustCode = False,
):
    """Parameters and memory of a condensing plan, from the config alone (no weights are read).

    The memory is the peak of the `cdmoe condense` run with the same options on this machine: with
    --mode/--activations auto, the mode and place it would pick from what is free now."""
    from ..models.plan import count
    from ..models.plan import plan as run_plan

    if budget is not None:
        from .budget import print_budget_plan

        return print_budget_plan(model, _float_list(budget), dtype, as_json, quantize)
    if quantize is not None:
        from ..methods.quantize import check_quantize

        check_quantize(quantize)
    known = count(model)
    result = run_plan(model, layers, _experts(experts, shared_only), _int_list(layer_ids), dtype, known=known)
    result.update(_memory(model, known, device, dtype, layers or result["moe_layers"], _experts(experts, shared_only),
                          mode, samples, seq_len, batch_size, activations, final, metric, out, quantize))
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"cdmoe plan: {result['model']}", show_header=True)
    table.add_column("")
    table.add_column("original", justify="right")
    table.add_column("condensed", justify="right")
    table.add_row("parameters", f"{result['total_params']:,}", f"{result['condensed_params']:,}")
    table.add_row(f"bytes ({result['dtype']})", f"{result['total_bytes'] / GiB:.2f} GiB",
                  f"{result['condensed_bytes'] / GiB:.2f} GiB")
    table.add_row("activated params / token", f"{result['active_params']:,}", f"{result['condensed_active_params']:,}")
    table.add_row("memory ratio", "100%", f"{100 * result['memory_ratio']:.1f}%")
    out_console.print(table)
    out_console.print(
        f"{len(result['condensed_layers'])} of {result['moe_layers']} MoE layers condensed "
        f"({result['condensed_layers']}), routed experts kept per layer: {result['experts_kept']} of "
        f"{result['routed_experts']} (top-k {result['top_k']}); counted from a {result['counted']}."
    )
    print_memory(result)


def _memory(model: str, known, device: str, dtype: str | None, layers: int, experts: int | None, mode: str,
            samples: int, seq_len: int, batch_size: int, activations: str, final: str, metric: str, out: Path,
            quantize: str | None = None) -> dict:
    """What :func:`cdmoe.methods.session.run_choice` decides for this run, with the free memory of this
    machine when ``device`` is here (else unknown: nothing is checked)."""
    import torch

    from ..memory.devices import resolve_device
    from ..memory.fit import free_now
    from ..methods.session import run_choice
    from ..models.loading import compute_dtype
    from ..models.plan import config_dtype
    from ..search.calibration import CalibSpec
    from ..search.run import SearchOptions

    here = device == "auto" or not device.startswith("cuda") or torch.cuda.is_available()
    dev = resolve_device(device) if here else torch.device(device)
    compute = compute_dtype(dtype, str(dev))
    if compute == "auto":  # a GPU computes in the checkpoint's dtype, as condense does
        compute = config_dtype(known[0]) or torch.float32
    search = SearchOptions(layers=layers, experts=experts, metric=metric, final=final, batch_size=batch_size)
    search.check()
    choice = run_choice(model, known, dev.type, compute, search, CalibSpec(samples=samples, seq_len=seq_len), mode,
                        activations, free_now(dev, out) if here else None, check=False, quantize=quantize)
    return {**choice.to_dict(), "device": str(dev), "compute_dtype": str(compute).replace("torch.", ""),
            "calibration_tokens": samples * seq_len}


def print_memory(result: dict) -> None:
    """The memory part of ``cdmoe plan``'s table output."""
    where = "host RAM" if result["device"] == "cpu" else f"{result['device']}"
    out_console.print(
        f"condense on {result['device']} ({result['compute_dtype']}, {result['calibration_tokens']:,} calibration "
        f"tokens): --mode {result['mode']} --activations {result['activations']} ({result['why']}); peak "
        f"{result['peak_device_bytes'] / GiB:.2f} GiB on {where}, {result['peak_host_bytes'] / GiB:.2f} GiB resident "
        f"in the process (imports included), {result['disk_bytes'] / GiB:.2f} GiB of disk."
    )
    for name, phase in result["phases"].items():  # on a CPU both parts are the same memory
        both = (f"{(phase['device_bytes'] + phase['host_bytes']) / GiB:7.2f} GiB" if result["device"] == "cpu" else
                f"device {phase['device_bytes'] / GiB:7.2f} GiB, host {phase['host_bytes'] / GiB:7.2f} GiB")
        out_console.print(f"  {name:>28}: {both}")
