"""``cdmoe plan``, ``condense``, ``apply``, ``sweep`` and ``finetune``: the CD-MoE commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .evaluate import print_report
from .options import (
    Calib,
    Device,
    Dtype,
    EvalText,
    EvalTokens,
    Experts,
    ExpertSelector,
    Final,
    Force,
    LayerSelector,
    Metric,
    Quantize,
    Samples,
    Seed,
    SeqLen,
    SharedOnly,
    TrustCode,
    _experts,
    _friendly,
    _int_list,
    out_console,
)


@_friendly
def plan(
    model: Annotated[str, typer.Argument(help="config.json, model directory or hub id")],
    layers: Annotated[Optional[int], typer.Option(help="number of MoE layers to condense (default: all)")] = None,
    experts: Experts = None,
    shared_only: SharedOnly = False,
    layer_ids: Annotated[Optional[str], typer.Option(help="exact layers, e.g. 3,5,7")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="dtype for bytes (default: the config's)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    trust_remote_code: TrustCode = False,
):
    """Memory of a condensing plan, from the config alone (no weights are read)."""
    from ..models.plan import plan as run_plan

    result = run_plan(model, layers, _experts(experts, shared_only), _int_list(layer_ids), dtype)
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"cdmoe plan: {result['model']}", show_header=True)
    table.add_column("")
    table.add_column("original", justify="right")
    table.add_column("condensed", justify="right")
    table.add_row("parameters", f"{result['total_params']:,}", f"{result['condensed_params']:,}")
    table.add_row(
        f"bytes ({result['dtype']})",
        f"{result['total_bytes'] / 2**30:.2f} GiB",
        f"{result['condensed_bytes'] / 2**30:.2f} GiB",
    )
    table.add_row("activated params / token", f"{result['active_params']:,}", f"{result['condensed_active_params']:,}")
    table.add_row("memory ratio", "100%", f"{100 * result['memory_ratio']:.1f}%")
    out_console.print(table)
    gib = 2**30
    out_console.print(
        f"sequential mode (--mode sequential): {(result['sequential_device_bytes']) / gib:.2f} GiB on the device "
        f"(largest decoder layer {result['largest_layer_bytes'] / gib:.2f} GiB + embeddings/norm/lm_head "
        f"{result['non_layer_bytes'] / gib:.2f} GiB; whole mode needs {result['total_bytes'] / gib:.2f} GiB), plus in "
        f"CPU memory a {result['activation_cache_bytes'] / gib:.1f} GiB layer-input cache for "
        f"{result['calibration_tokens']:,} calibration tokens ({result['dtype']}) and up to "
        f"{result['candidate_stream_bytes'] / gib:.1f} GiB of Algorithm 2 candidate streams; --activations disk "
        f"moves both to disk ({result['activation_disk_bytes'] / gib:.1f} GiB of disk, slower)."
    )
    out_console.print(
        f"{len(result['condensed_layers'])} of {result['moe_layers']} MoE layers condensed "
        f"({result['condensed_layers']}), routed experts kept per layer: {result['experts_kept']} of "
        f"{result['routed_experts']} (top-k {result['top_k']}); counted from a {result['counted']}."
    )


@_friendly
def apply(
    model: Annotated[str, typer.Argument(help="model directory or hub id")],
    record: Annotated[Path, typer.Argument(help="a cdmoe.json record (or an output directory holding one)")],
    out: Annotated[Path, typer.Option(help="output directory")],
    dtype: Dtype = "auto",
    device: Device = "auto",
    force: Force = False,
    trust_remote_code: TrustCode = False,
):
    """Apply the layers/experts/gates of an earlier record to a model and save it (no search)."""
    from ..methods.apply import apply_record

    result = apply_record(model, record, out, dtype=dtype, force=force, device=device)
    out_console.print(f"wrote {result}")


@_friendly
def condense(
    model: Annotated[str, typer.Argument(help="model directory or hub id")],
    out: Annotated[Path, typer.Option(help="output directory (must not exist, unless --force)")],
    layers: Annotated[int, typer.Option(help="N: MoE layers to condense")],
    experts: Experts = None,
    shared_only: SharedOnly = False,
    calib: Calib = "c4",
    samples: Samples = 100,
    seq_len: SeqLen = 512,
    seed: Seed = 0,
    metric: Metric = "js",
    final: Final = "hidden",
    expert_selector: ExpertSelector = "greedy",
    layer_selector: LayerSelector = "greedy",
    batch_size: Annotated[int, typer.Option(help="calibration batch size")] = 8,
    dtype: Dtype = "auto",
    eval_text: EvalText = None,
    eval_tokens: EvalTokens = 50_000,
    force: Force = False,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    quantize: Quantize = None,
    mode: Annotated[
        str,
        typer.Option(
            help="whole | sequential (one decoder layer in memory at a time) | auto "
            "(sequential when the weights do not fit the device)"
        ),
    ] = "auto",
    device: Device = "auto",
    activations: Annotated[
        str,
        typer.Option(
            help="memory | disk: where calibration hidden states wait between layers (disk: less RAM, slower)"
        ),
    ] = "memory",
    activations_dir: Annotated[
        Optional[Path],
        typer.Option(help="where --activations disk writes (default: inside .OUT.partial/ beside --out)"),
    ] = None,
    trust_remote_code: TrustCode = False,
):
    """Condense N MoE layers with CD-MoE (greedy experts and layers on calibration data) and save."""
    from ..methods.condense import EvalOptions
    from ..methods.condense import condense as run_condense
    from ..search.calibration import CalibSpec
    from ..search.run import SearchOptions

    record = run_condense(
        model,
        out,
        SearchOptions(
            layers=layers,
            experts=_experts(experts, shared_only),
            metric=metric,
            final=final,
            batch_size=batch_size,
            expert_selector=expert_selector,
            layer_selector=layer_selector,
            seed=seed,
        ),
        CalibSpec(source=calib, samples=samples, seq_len=seq_len, seed=seed),
        EvalOptions(text=eval_text, max_tokens=eval_tokens),
        dtype=dtype,
        force=force,
        show_progress=not quiet,
        quantize=quantize,
        mode=mode,
        device=device,
        activations=activations,
        activations_dir=activations_dir,
    )
    print_summary(record, out)


@_friendly
def finetune(
    directory: Annotated[Path, typer.Argument(help="a condensed directory (output of cdmoe condense)")],
    data: Annotated[str, typer.Option(help="local .txt/.txt.gz/.jsonl/.json/.parquet or HF name[:config[:split]]")],
    out: Annotated[Path, typer.Option(help="output directory (must not exist, unless --force)")],
    data_format: Annotated[str, typer.Option("--format", help="auto | text | commonsense | mmlu")] = "auto",
    lora: Annotated[bool, typer.Option("--lora", help="LoRA adapters on the condensed layers, merged on save")] = False,
    lora_r: Annotated[int, typer.Option(help="LoRA rank")] = 8,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha")] = 16,
    steps: Annotated[Optional[int], typer.Option(help="optimizer steps (overrides --epochs)")] = None,
    epochs: Annotated[float, typer.Option(help="passes over the data (when --steps is not given)")] = 1.0,
    lr: Annotated[float, typer.Option(help="peak learning rate")] = 1e-4,
    warmup: Annotated[float, typer.Option(help="warm-up share of the steps")] = 0.1,
    schedule: Annotated[str, typer.Option(help="learning-rate schedule (transformers lr_scheduler_type)")] = "cosine",
    batch_size: Annotated[int, typer.Option(help="examples per step (per device)")] = 8,
    grad_accum: Annotated[int, typer.Option(help="gradient accumulation steps")] = 1,
    seq_len: Annotated[int, typer.Option(help="tokens per packed text block / max pair length")] = 256,
    seed: Annotated[int, typer.Option(help="seed for data order and LoRA init")] = 0,
    save_steps: Annotated[int, typer.Option(help="Trainer checkpoint every N steps")] = 100,
    logging_steps: Annotated[int, typer.Option(help="log the loss every N steps")] = 10,
    checkpoint_dir: Annotated[Optional[Path], typer.Option(help="checkpoint dir (default OUT.checkpoints)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the last checkpoint there")] = False,
    keep_checkpoints: Annotated[bool, typer.Option(help="keep --checkpoint-dir after success")] = False,
    eval_text: EvalText = None,
    eval_tokens: EvalTokens = 50_000,
    dtype: Dtype = "auto",
    device: Device = "auto",
    force: Force = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    trust_remote_code: TrustCode = False,
):
    """Fine-tune only the condensed layers (full or LoRA) of a condensed directory; save like a condensed one."""
    from ..methods.condense import EvalOptions
    from ..methods.finetune import FinetuneOptions
    from ..methods.finetune import finetune as run_finetune

    options = FinetuneOptions(
        data=data,
        format=data_format,
        steps=steps,
        epochs=epochs,
        lr=lr,
        warmup_ratio=warmup,
        schedule=schedule,
        batch_size=batch_size,
        grad_accum=grad_accum,
        seq_len=seq_len,
        seed=seed,
        lora=lora,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        save_steps=save_steps,
        logging_steps=logging_steps,
        dtype=dtype,
    )
    record = run_finetune(
        directory,
        out,
        options,
        EvalOptions(text=eval_text, max_tokens=eval_tokens),
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        keep_checkpoints=keep_checkpoints,
        force=force,
        show_progress=not quiet,
        log=out_console.print,
        device=device,
    )
    ft = record["finetune"]
    out_console.print(
        f"{ft['mode']} fine-tuning: {ft['steps']} steps, final loss {ft['final_loss']:.4f}, "
        f"trainable {ft['trainable_params']:,} ({100 * ft['trainable_share']:.2f}%); wrote {out}"
    )


@_friendly
def sweep(
    model: Annotated[str, typer.Argument(help="model directory or hub id")],
    out: Annotated[Path, typer.Option(help="output root: one layers-N directory per point, plus report/")],
    layers: Annotated[str, typer.Option(help="layer counts, e.g. 1,2,4")],
    experts: Experts = None,
    shared_only: SharedOnly = False,
    calib: Calib = "c4",
    samples: Samples = 100,
    seq_len: SeqLen = 512,
    seed: Seed = 0,
    metric: Metric = "js",
    final: Final = "hidden",
    eval_text: EvalText = None,
    eval_tokens: EvalTokens = 50_000,
    dtype: Dtype = "auto",
    device: Device = "auto",
    force: Force = False,
    trust_remote_code: TrustCode = False,
):
    """Condense several N from one calibration and one greedy layer order; write each point and a report."""
    from ..comparison.sweep import sweep as run_sweep
    from ..methods.condense import EvalOptions
    from ..search.calibration import CalibSpec
    from ..search.run import SearchOptions

    counts = _int_list(layers) or []
    report = run_sweep(
        model,
        out,
        counts,
        SearchOptions(
            layers=max(counts, default=1), experts=_experts(experts, shared_only), metric=metric, final=final
        ),
        CalibSpec(calib, samples, seq_len, seed),
        EvalOptions(text=eval_text, max_tokens=eval_tokens),
        dtype=dtype,
        force=force,
        device=device,
    )
    print_report(report, out / "report")


def print_summary(record: dict, out: Path) -> None:
    params, search = record["params"], record["search"]
    table = Table(title="cdmoe condense", show_header=True)
    table.add_column("")
    table.add_column("original", justify="right")
    table.add_column("condensed", justify="right")
    table.add_row("parameters", f"{params['total_params']:,}", f"{params['condensed_params']:,}")
    table.add_row("memory ratio", "100%", f"{100 * params['memory_ratio']:.1f}%")
    table.add_row("activated params / token", f"{params['active_params']:,}", f"{params['condensed_active_params']:,}")
    ev = record.get("evaluation")
    if ev:
        table.add_row(
            f"perplexity ({ev['tokens']:,} held-out tokens)", f"{ev['original_ppl']:.2f}", f"{ev['condensed_ppl']:.2f}"
        )
        if "quantized_ppl" in ev:
            table.add_row(
                f"  then quantised ({record['quantization'].get('scheme') or record['quantization']['bits']}, from disk)", "", f"{ev['quantized_ppl']:.2f}"
            )
        if "random_experts_ppl" in ev:
            table.add_row("  same layers, random experts", "", f"{ev['random_experts_ppl']:.2f}")
            table.add_row("  same layers dropped (Layer Drop)", "", f"{ev['dropped_layers_ppl']:.2f}")
    out_console.print(table)
    order = ", ".join(
        f"{layer} ({score:.4f})" for layer, score in zip(search["layer_order"], search["layer_step_scores"])
    )
    out_console.print(f"layers chosen (greedy order, {search['metric'].upper()} after each step): {order}")
    for c in record["condensed"]:
        kept = ", ".join(f"{e}:{g:.3f}" for e, g in zip(c["experts"], c["gates"])) or "shared experts only"
        out_console.print(f"  layer {c['layer']}: experts:gates {kept}")
    timings = search["timings"]
    out_console.print(
        f"search {timings['expert_search_s'] + timings['layer_search_s']:.1f}s, total "
        f"{timings['total_s']:.1f}s; wrote {out} (record cdmoe.json, plots/single_layer_js.png)"
    )
