"""``cdmoe heal``: train the condensed layers of a condensed directory to reproduce the original MoE blocks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .options import Activations, Device, Dtype, EvalText, EvalTokens, Force, Mode, TrustCode, _friendly, out_console

HealSamples = Annotated[
    Optional[int],
    typer.Option(help="calibration windows to heal on (default: as many as the search used; with condense: implies --heal)"),
]


@_friendly
def heal(
    directory: Annotated[Path, typer.Argument(help="a condensed directory (output of cdmoe condense)")],
    out: Annotated[Path, typer.Option(help="output directory (must not exist, unless --force)")],
    original: Annotated[
        Optional[str], typer.Option(help="the model it was condensed from (default: the record's base_model)")
    ] = None,
    calib: Annotated[Optional[str], typer.Option(help="calibration text (default: the record's)")] = None,
    samples: HealSamples = None,
    seq_len: Annotated[Optional[int], typer.Option(help="tokens per window (default: the record's)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="window sampling seed (default: the record's)")] = None,
    steps: Annotated[int, typer.Option(help="maximum optimizer steps per layer")] = 300,
    lr: Annotated[float, typer.Option(help="Adam step size relative to each weight's RMS (cosine decay)")] = 0.05,
    batch_tokens: Annotated[int, typer.Option(help="tokens per optimizer step")] = 4096,
    val_share: Annotated[float, typer.Option(help="share of the windows held out for early stopping")] = 0.1,
    eval_every: Annotated[int, typer.Option(help="steps between held-out scores")] = 25,
    patience: Annotated[int, typer.Option(help="held-out scores without improvement before stopping")] = 4,
    dtype: Dtype = "auto",
    mode: Mode = "auto",
    device: Device = "auto",
    activations: Activations = "auto",
    activations_dir: Annotated[Optional[Path], typer.Option(help="where --activations disk writes")] = None,
    eval_text: EvalText = None,
    eval_tokens: EvalTokens = 50_000,
    force: Force = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    trust_remote_code: TrustCode = False,
):
    """Heal the condensed layers (layer-local distillation on calibration text, no labels); save like a condensed one."""
    from ..methods.condense import EvalOptions
    from ..methods.heal import HealOptions
    from ..methods.heal import heal as run_heal

    options = HealOptions(samples=samples, val_share=val_share, steps=steps, lr=lr, batch_tokens=batch_tokens,
                          eval_every=eval_every, patience=patience)
    record = run_heal(directory, out, options, original=original, calib=calib, seq_len=seq_len, seed=seed,
                      evaluation=EvalOptions(text=eval_text, max_tokens=eval_tokens), dtype=dtype, mode=mode,
                      device=device, activations=activations, activations_dir=activations_dir, force=force,
                      show_progress=not quiet)
    print_heal(record["heal"], out)


def print_heal(entry: dict, out: Path) -> None:
    """The per-layer errors before/after and the held-out perplexity, if measured."""
    table = Table(title="cdmoe heal: relative squared error of each condensed layer's output", show_header=True)
    for column in ("layer", "steps", "train before", "train after", "held-out before", "held-out after"):
        table.add_column(column, justify="right")
    for layer, fit in entry["layers"].items():
        b, a = fit["error_before"], fit["error_after"]
        table.add_row(layer, f"{fit['best_step']}/{fit['steps']}", f"{b['train']:.4f}", f"{a['train']:.4f}",
                      f"{b['val']:.4f}", f"{a['val']:.4f}")
    out_console.print(table)
    ev = entry.get("evaluation")
    if ev:
        gap = f"; {100 * ev['gap_closed']:.1f}% of the gap to the original ({ev['original_ppl']:.2f}) closed" \
            if "gap_closed" in ev else ""
        out_console.print(f"held-out perplexity ({ev['tokens']:,} tokens): {ev['ppl_before']:.2f} -> "
                          f"{ev['ppl_after']:.2f}{gap}")
    cal = entry["calibration"]
    out_console.print(f"{cal['tokens_train']:,} training + {cal['tokens_val']:,} held-out calibration tokens, "
                      f"{entry['seconds']:.1f}s ({entry['mode']}, {entry['device']}); wrote {out}")
