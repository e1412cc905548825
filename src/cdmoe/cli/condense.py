"""``cdmoe condense``, ``apply``, ``sweep`` and ``finetune``: the CD-MoE commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .evaluate import print_report
from .heal import HealSamples
from .options import (
    Activations,
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
    Mode,
    Quantize,
    Samples,
    Seed,
    SeqLen,
    SharedOnly,
    TrustCode,
    _experts,
    _float_list,
    _friendly,
    _int_list,
    out_console,
)
from .summary import print_budget_summary, print_summary


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
    layers: Annotated[Optional[int], typer.Option(help="N: MoE layers to condense")] = None,
    budget: Annotated[Optional[float], typer.Option(
        help="instead of --layers: plan keep / prune / condense / drop per MoE layer within this ratio of the "
             "original weight bytes (a ceiling), e.g. 0.6")] = None,
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
    mode: Mode = "auto",
    device: Device = "auto",
    activations: Activations = "auto",
    activations_dir: Annotated[
        Optional[Path],
        typer.Option(help="where --activations disk writes (default: inside .OUT.partial/ beside --out)"),
    ] = None,
    heal: Annotated[bool, typer.Option("--heal", help="then heal the condensed layers (see cdmoe heal)")] = False,
    heal_samples: HealSamples = None,
    memory_check: Annotated[
        bool, typer.Option(help="stop before loading when the estimated memory or disk does not fit (cdmoe plan)")
    ] = True,
    trust_remote_code: TrustCode = False,
):
    """Condense N MoE layers with CD-MoE (greedy experts and layers on calibration data), or plan every MoE
    layer within a byte budget (--budget), and save."""
    from ..methods.condense import EvalOptions
    from ..methods.heal import HealOptions
    from ..methods.condense import condense as run_condense
    from ..search.calibration import CalibSpec
    from ..search.run import SearchOptions
    from ..methods.budget_plan import check_budget_options

    check_budget_options(layers, budget, {"--experts": experts is not None, "--shared-only": shared_only,
                                          "--expert-selector": expert_selector != "greedy",
                                          "--layer-selector": layer_selector != "greedy", "--eval-text": bool(eval_text)})
    if budget is not None:
        from ..methods.budget_plan import condense_budget
        from ..search.plan_run import PlanOptions

        record = condense_budget(model, out, PlanOptions(budgets=(budget,), metric=metric, final=final,
                                                         batch_size=batch_size),
                                 CalibSpec(source=calib, samples=samples, seq_len=seq_len, seed=seed), dtype=dtype,
                                 force=force, show_progress=not quiet, mode=mode, device=device,
                                 activations=activations, activations_dir=activations_dir, memory_check=memory_check,
                                 heal=HealOptions(samples=heal_samples) if heal or heal_samples is not None else None,
                                 quantize=quantize)
        return print_budget_summary(record, out)

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
        heal=HealOptions(samples=heal_samples) if heal or heal_samples is not None else None,
        memory_check=memory_check,
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
