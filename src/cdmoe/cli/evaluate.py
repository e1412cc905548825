"""``cdmoe eval``, ``measure`` and ``report``: scoring and measuring output directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import CdmoeError
from .options import Device, Dtype, TrustCode, _friendly, out_console


@_friendly
def eval_cmd(
    model: Annotated[str, typer.Argument(help="model directory (original or condensed) or hub id")],
    tasks: Annotated[str, typer.Option(help="paper | demo | comma-separated lm-eval task names")] = "paper",
    task_text: Annotated[Optional[str], typer.Option(help="held-out text for --tasks demo")] = None,
    limit: Annotated[Optional[int], typer.Option(help="examples per task (for quick checks)")] = None,
    batch_size: Annotated[str, typer.Option(help="lm-eval batch size, or auto")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="results JSON (default: ./eval.json)")] = None,
    dtype: Dtype = "auto",
    device: Device = "auto",
    ppl_text: Annotated[
        Optional[str], typer.Option(help="also: perplexity on this text (.txt/.jsonl/.parquet or HF name:config:split)")
    ] = None,
    ppl_seq_len: Annotated[int, typer.Option(help="perplexity window, tokens")] = 512,
    ppl_stride: Annotated[
        Optional[int], typer.Option(help="perplexity stride (default: the window; non-overlapping)")
    ] = None,
    ppl_tokens: Annotated[
        Optional[int], typer.Option(help="max tokens of --ppl-text (default or 0: the whole text)")
    ] = None,
    force: Annotated[bool, typer.Option(help="replace --out if it exists")] = False,
    backend: Annotated[
        str, typer.Option(help="hf: transformers in this process | vllm: lm-eval's vLLM model in the vLLM venv")
    ] = "hf",
    vllm_python: Annotated[
        Optional[str], typer.Option(help="Python of the vLLM venv (default: $CDMOE_VLLM_PYTHON, .venv-vllm/bin/python)")
    ] = None,
    tensor_parallel_size: Annotated[
        Optional[int], typer.Option(help="--backend vllm: GPUs to shard the model over (default 1)")
    ] = None,
    max_model_len: Annotated[
        Optional[int], typer.Option(help="--backend vllm: context length of vLLM's KV cache (default: the model's)")
    ] = None,
    trust_remote_code: TrustCode = False,
):
    """Zero-shot evaluation with lm-evaluation-harness (the paper's 8 tasks by default) and perplexity."""
    from ..evaluation.lmeval import run_eval

    result = run_eval(
        model,
        tasks,
        task_text,
        limit,
        batch_size,
        out,
        dtype,
        ppl_text,
        ppl_seq_len,
        ppl_stride,
        ppl_tokens,
        force=force,
        backend=backend,
        vllm_python=vllm_python,
        device=device,
        tensor_parallel_size=tensor_parallel_size,
        max_model_len=max_model_len,
    )
    table = Table(title=f"cdmoe eval: {model}")
    table.add_column("task")
    table.add_column("score", justify="right")
    for task, value in result["summary"].items():
        table.add_row(task, f"{value:.2f}")
    out_console.print(table)
    if "written_to" in result:
        out_console.print(f"wrote {result['written_to']}")


@_friendly
def measure(
    original: Annotated[Path, typer.Argument(help="original model directory")],
    condensed: Annotated[Path, typer.Argument(help="condensed output directory")],
    dtype: Annotated[str, typer.Option(help="dtype to load both in (or auto: the checkpoint's)")] = "float32",
    device: Annotated[str, typer.Option(help="auto | cpu (peak RSS) | cuda | cuda:N (also peak GPU memory)")] = "auto",
    repeats: Annotated[int, typer.Option(help="fresh processes per model; the median peak is reported")] = 3,
    out: Annotated[Path, typer.Option(help="results JSON")] = Path("memory.json"),
    force: Annotated[bool, typer.Option(help="replace --out if it exists")] = False,
    trust_remote_code: TrustCode = False,
):
    """Measured memory: bytes on disk and peak RSS loading + running each model (fresh process each)."""
    from ..evaluation.measure import measure_memory
    from ..io.output_dir import check_output_file, write_output_file
    from ..models.placement import resolve_device

    device = str(resolve_device(device))
    if repeats < 1:
        raise CdmoeError(f"--repeats must be at least 1, got {repeats}")
    check_output_file(out, force, inputs=(original, condensed))
    result = measure_memory(original, condensed, dtype, repeats, device=device)
    write_output_file(out, json.dumps(result, indent=2) + "\n")
    table = Table(title="cdmoe measure")
    for col in ("", "original", "condensed", "ratio"):
        table.add_column(col, justify="right")
    for key, label in (
        ("disk_bytes", "weights on disk"),
        ("load_bytes", "peak RSS after load"),
        ("load_and_run_bytes", "peak RSS load + forward"),
        ("device_load_bytes", f"peak {device} memory after load"),
        ("device_load_and_run_bytes", f"peak {device} memory load + forward"),
    ):
        if key not in result["original"]:
            continue
        table.add_row(
            label,
            f"{result['original'][key] / 2**20:.1f} MiB",
            f"{result['condensed'][key] / 2**20:.1f} MiB",
            f"{result['ratios'][key]:.3f}",
        )
    out_console.print(table)
    out_console.print(f"wrote {out}")


@_friendly
def report(
    dirs: Annotated[list[Path], typer.Argument(help="cdmoe output directories")],
    out: Annotated[Path, typer.Option(help="output directory for report.json and the plots")] = Path("report"),
    force: Annotated[bool, typer.Option(help="replace --out if an earlier report is there")] = False,
):
    """Gather condense records and evaluations of output directories into report.json and PNG plots."""
    from ..comparison.report import write_report

    print_report(write_report(dirs, out, force), out)


def print_report(result: dict, out: Path) -> None:
    table = Table(title="cdmoe report")
    for col in ("directory", "N", "memory", "perplexity", "avg acc"):
        table.add_column(col, justify="right")
    for row in result["rows"]:
        ppl = f"{row['ppl']:.2f}" if row.get("ppl") else "-"
        acc = f"{row['average_accuracy']:.1f}" if row.get("average_accuracy") is not None else "-"
        table.add_row(Path(row["dir"]).name, str(len(row["layers"])), f"{100 * row['memory_ratio']:.1f}%", ppl, acc)
    out_console.print(table)
    out_console.print(f"wrote {out / 'report.json'} and {', '.join(result['plots'].values())}")
