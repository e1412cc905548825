"""``cdmoe baseline`` and ``cdmoe compare``: the paper's baselines, and everything side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import CdmoeError
from .options import (
    Calib,
    Device,
    Dtype,
    EvalText,
    EvalTokens,
    Force,
    Quantize,
    Samples,
    Seed,
    SeqLen,
    TrustCode,
    _friendly,
    console,
    out_console,
)


@_friendly
def baseline(
    method: Annotated[
        str, typer.Argument(help="layer-drop | block-drop | expert-drop | reap | msmoe | msmoe-restricted | slim")
    ],
    model: Annotated[str, typer.Argument(help="model directory or hub id")],
    out: Annotated[Path, typer.Option(help="output directory (must not exist, unless --force)")],
    layers: Annotated[
        Optional[int], typer.Option(help="N layers (layer-drop) or decoder blocks (block-drop) to drop")
    ] = None,
    keep_experts: Annotated[
        Optional[int],
        typer.Option(help="E' routed experts kept per layer (expert-drop, reap, msmoe-restricted; msmoe: the average)"),
    ] = None,
    quantize: Quantize = None,
    calib: Calib = "c4",
    samples: Samples = 100,
    seq_len: SeqLen = 512,
    seed: Seed = 0,
    dtype: Dtype = "auto",
    device: Device = "auto",
    eval_text: EvalText = None,
    eval_tokens: EvalTokens = 50_000,
    force: Force = False,
    trust_remote_code: TrustCode = False,
):
    """Run a baseline (Layer/Block Drop, Expert Drop, REAP, M-SMoE, Expert Slimming) and save it like condense."""
    from ..methods.baselines import BaselineOptions, run_baseline
    from ..search.calibration import CalibSpec

    record = run_baseline(
        model,
        out,
        BaselineOptions(method, layers=layers, keep_experts=keep_experts, quantize=quantize),
        CalibSpec(calib, samples, seq_len, seed),
        eval_text,
        eval_tokens,
        dtype,
        force,
        device=device,
    )
    params = record["params"]
    table = Table(title=f"cdmoe baseline {method}")
    for col in ("", "original", "result"):
        table.add_column(col, justify="right")
    table.add_row("parameters", f"{params['total_params']:,}", f"{params['condensed_params']:,}")
    table.add_row("weights on disk", "", f"{record['weight_bytes']:,} bytes")
    ev = record.get("evaluation")
    if ev:
        table.add_row(f"perplexity ({ev['tokens']:,} held-out tokens)", f"{ev['original_ppl']:.2f}", f"{ev['ppl']:.2f}")
    out_console.print(table)
    out_console.print(f"wrote {out}")


@_friendly
def compare(
    model: Annotated[str, typer.Argument(help="model directory or hub id")],
    out: Annotated[Path, typer.Option(help="output directory: compare.md/.json/.png and points/")],
    budget: Annotated[
        str, typer.Option(help="memory ratios (weight bytes / original), e.g. 0.8,0.6; each a ceiling")
    ],
    methods: Annotated[
        str, typer.Option(help="default | ablations | all | comma-separated names (see cdmoe.comparison.compare)")
    ] = "default",
    calib: Calib = "c4",
    samples: Samples = 100,
    seq_len: SeqLen = 512,
    seed: Seed = 0,
    eval_text: EvalText = None,
    eval_tokens: EvalTokens = 50_000,
    tasks: Annotated[Optional[str], typer.Option(help="lm-eval tasks: paper | demo | names (default: none)")] = None,
    task_text: Annotated[Optional[str], typer.Option(help="held-out text for --tasks demo")] = None,
    task_batch_size: Annotated[int, typer.Option(help="lm-eval batch size")] = 32,
    peak_rss: Annotated[
        bool,
        typer.Option(
            "--peak-rss", help="also measure each point's peak RAM loading and running it (one fresh process per point)"
        ),
    ] = False,
    dtype: Dtype = "auto",
    device: Device = "auto",
    force: Force = False,
    trust_remote_code: TrustCode = False,
):
    """CD-MoE, its ablations and the baselines at matched memory budgets, in one table (MD + JSON + plot)."""
    from ..comparison.compare import compare as run_compare
    from ..comparison.compare import parse_methods
    from ..search.calibration import CalibSpec

    try:
        budgets = [float(b) for b in budget.split(",") if b.strip()]
    except ValueError:
        raise CdmoeError(f"--budget expects comma-separated ratios such as 0.8,0.6, got {budget!r}") from None
    result = run_compare(
        model,
        out,
        budgets,
        parse_methods(methods),
        CalibSpec(calib, samples, seq_len, seed),
        eval_text,
        eval_tokens,
        tasks,
        task_text,
        dtype,
        force,
        measure_rss=peak_rss,
        task_batch_size=task_batch_size,
        device=device,
        progress=lambda msg: console.print(msg, highlight=False),
    )
    print((out / "compare.md").read_text())
    out_console.print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {result['plot']}")
