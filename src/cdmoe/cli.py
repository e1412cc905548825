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

# options shared by several commands
Experts = Annotated[Optional[int], typer.Option(help="K routed experts kept per layer (default: top-k)")]
SharedOnly = Annotated[bool, typer.Option("--shared-only", help="keep shared experts only (CD-MoE-S, K=0)")]
Calib = Annotated[str, typer.Option(help="c4 | local .txt/.jsonl/.parquet | HF dataset name[:config[:split]]")]
Samples = Annotated[int, typer.Option(help="calibration samples")]
SeqLen = Annotated[int, typer.Option(help="tokens per calibration sample")]
Seed = Annotated[int, typer.Option(help="calibration sampling seed")]
Metric = Annotated[str, typer.Option(help="search metric: js | kl | ppl")]
Final = Annotated[str, typer.Option(help="final-output distribution for layer search: hidden | logits")]
EvalText = Annotated[Optional[str], typer.Option(help="held-out text for perplexity before/after")]
EvalTokens = Annotated[int, typer.Option(help="max tokens of --eval-text")]
Dtype = Annotated[str, typer.Option(help="auto | bf16 | fp16 | fp32")]
Force = Annotated[bool, typer.Option(help="replace the output if it exists")]
ExpertSelector = Annotated[str, typer.Option(help="greedy (Alg. 1) | random | l1 | frequency | pl-alpha-hill")]
LayerSelector = Annotated[str, typer.Option(help="greedy (Alg. 2) | layer-rank | global-layer-rank")]
TrustCode = Annotated[bool, typer.Option(
    "--trust-remote-code", help="run Python code shipped inside the checkpoint (auto_map); off by default")]
Quantize = Annotated[Optional[str], typer.Option(help="then quantise experts / condensed MLPs: int8 | int4 (bitsandbytes)")]


def _experts(experts: int | None, shared_only: bool) -> int | None:
    from .search import experts_option  # imported here: `cdmoe --help` stays light

    return experts_option(experts, shared_only)


def _friendly(fn):
    """Turn a CdmoeError into a one-line message and exit code 2; apply ``--trust-remote-code`` to every load."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .remote_code import trust_remote_code

        try:
            with trust_remote_code(kwargs.get("trust_remote_code", False)):  # one decision for every load
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
    experts: Experts = None,
    shared_only: SharedOnly = False,
    layer_ids: Annotated[Optional[str], typer.Option(help="exact layers, e.g. 3,5,7")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="dtype for bytes (default: the config's)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    trust_remote_code: TrustCode = False,
):
    """Memory of a condensing plan, from the config alone (no weights are read)."""
    from .plan import plan as run_plan

    result = run_plan(model, layers, _experts(experts, shared_only), _int_list(layer_ids), dtype)
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


@app.command()
@_friendly
def apply(
    model: Annotated[str, typer.Argument(help="model directory or hub id")],
    record: Annotated[Path, typer.Argument(help="a cdmoe.json record (or an output directory holding one)")],
    out: Annotated[Path, typer.Option(help="output directory")],
    dtype: Dtype = "auto",
    force: Force = False,
    trust_remote_code: TrustCode = False,
):
    """Apply the layers/experts/gates of an earlier record to a model and save it (no search)."""
    from .api import apply_record

    result = apply_record(model, record, out, dtype=dtype, force=force)
    out_console.print(f"wrote {result}")


@app.command()
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
    mode: Annotated[str, typer.Option(help="whole | sequential (one decoder layer in memory at a time) | auto "
                                           "(sequential when the weights do not fit the device)")] = "auto",
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N | auto (several GPUs: accelerate device map)")] = "cpu",
    activations: Annotated[str, typer.Option(help="memory | disk: where calibration hidden states wait between "
                                                  "layers (disk: less RAM, slower)")] = "memory",
    activations_dir: Annotated[Optional[Path], typer.Option(help="where --activations disk writes (default: "
                                                                  "inside .OUT.partial/ beside --out)")] = None,
    trust_remote_code: TrustCode = False,
):
    """Condense N MoE layers with CD-MoE (greedy experts and layers on calibration data) and save."""
    from .calibration import CalibSpec
    from .condense_run import EvalOptions
    from .condense_run import condense as run_condense
    from .search import SearchOptions

    record = run_condense(
        model,
        out,
        SearchOptions(layers=layers, experts=_experts(experts, shared_only), metric=metric, final=final,
                      batch_size=batch_size, expert_selector=expert_selector, layer_selector=layer_selector, seed=seed),
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


@app.command()
@_friendly
def baseline(
    method: Annotated[str, typer.Argument(help="layer-drop | block-drop | expert-drop | msmoe | msmoe-restricted | slim")],
    model: Annotated[str, typer.Argument(help="model directory or hub id")],
    out: Annotated[Path, typer.Option(help="output directory (must not exist, unless --force)")],
    layers: Annotated[Optional[int], typer.Option(help="N layers (layer-drop) or decoder blocks (block-drop) to drop")] = None,
    keep_experts: Annotated[Optional[int], typer.Option(help="E' routed experts kept per layer (expert-drop, msmoe-restricted; msmoe: the average)")] = None,
    quantize: Quantize = None,
    calib: Calib = "c4",
    samples: Samples = 100,
    seq_len: SeqLen = 512,
    seed: Seed = 0,
    dtype: Dtype = "auto",
    eval_text: EvalText = None,
    eval_tokens: EvalTokens = 50_000,
    force: Force = False,
    trust_remote_code: TrustCode = False,
):
    """Run a baseline (Layer/Block Drop, Expert Drop, M-SMoE, Expert Slimming) and save it like condense."""
    from .baselines import BaselineOptions, run_baseline
    from .calibration import CalibSpec

    record = run_baseline(model, out, BaselineOptions(method, layers=layers, keep_experts=keep_experts, quantize=quantize),
                          CalibSpec(calib, samples, seq_len, seed), eval_text, eval_tokens, dtype, force)
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


@app.command()
@_friendly
def compare(
    model: Annotated[str, typer.Argument(help="model directory or hub id")],
    out: Annotated[Path, typer.Option(help="output directory: compare.md/.json/.png and points/")],
    budget: Annotated[str, typer.Option(help="memory ratios (weight bytes / original), e.g. 0.8,0.6")],
    methods: Annotated[str, typer.Option(help="default | ablations | all | comma-separated names (see cdmoe.compare)")] = "default",
    calib: Calib = "c4",
    samples: Samples = 100,
    seq_len: SeqLen = 512,
    seed: Seed = 0,
    eval_text: EvalText = None,
    eval_tokens: EvalTokens = 50_000,
    tasks: Annotated[Optional[str], typer.Option(help="lm-eval tasks: paper | demo | names (default: none)")] = None,
    task_text: Annotated[Optional[str], typer.Option(help="held-out text for --tasks demo")] = None,
    task_batch_size: Annotated[int, typer.Option(help="lm-eval batch size")] = 32,
    peak_rss: Annotated[bool, typer.Option("--peak-rss", help="also measure each point's peak RAM loading and "
                                                               "running it (one fresh process per point)")] = False,
    dtype: Dtype = "auto",
    force: Force = False,
    trust_remote_code: TrustCode = False,
):
    """CD-MoE, its ablations and the baselines at matched memory budgets, in one table (MD + JSON + plot)."""
    from .calibration import CalibSpec
    from .compare import compare as run_compare
    from .compare import parse_methods

    try:
        budgets = [float(b) for b in budget.split(",") if b.strip()]
    except ValueError:
        raise CdmoeError(f"--budget expects comma-separated ratios such as 0.8,0.6, got {budget!r}") from None
    result = run_compare(model, out, budgets, parse_methods(methods), CalibSpec(calib, samples, seq_len, seed),
                         eval_text, eval_tokens, tasks, task_text, dtype, force, measure_rss=peak_rss,
                         task_batch_size=task_batch_size,
                         progress=lambda msg: console.print(msg, highlight=False, markup=False))
    print((out / "compare.md").read_text())
    out_console.print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {result['plot']}")


@app.command()
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
    force: Force = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    trust_remote_code: TrustCode = False,
):
    """Fine-tune only the condensed layers (full or LoRA) of a condensed directory; save like a condensed one."""
    from .condense_run import EvalOptions
    from .finetune import FinetuneOptions
    from .finetune import finetune as run_finetune

    options = FinetuneOptions(data=data, format=data_format, steps=steps, epochs=epochs, lr=lr, warmup_ratio=warmup,
                              schedule=schedule, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len,
                              seed=seed, lora=lora, lora_r=lora_r, lora_alpha=lora_alpha, save_steps=save_steps,
                              logging_steps=logging_steps, dtype=dtype)
    record = run_finetune(directory, out, options, EvalOptions(text=eval_text, max_tokens=eval_tokens),
                          checkpoint_dir=checkpoint_dir, resume=resume, keep_checkpoints=keep_checkpoints,
                          force=force, show_progress=not quiet, log=out_console.print)
    ft = record["finetune"]
    out_console.print(f"{ft['mode']} fine-tuning: {ft['steps']} steps, final loss {ft['final_loss']:.4f}, "
                      f"trainable {ft['trainable_params']:,} ({100 * ft['trainable_share']:.2f}%); wrote {out}")


@app.command(name="eval")
@_friendly
def eval_cmd(
    model: Annotated[str, typer.Argument(help="model directory (original or condensed) or hub id")],
    tasks: Annotated[str, typer.Option(help="paper | demo | comma-separated lm-eval task names")] = "paper",
    task_text: Annotated[Optional[str], typer.Option(help="held-out text for --tasks demo")] = None,
    limit: Annotated[Optional[int], typer.Option(help="examples per task (for quick checks)")] = None,
    batch_size: Annotated[str, typer.Option(help="lm-eval batch size, or auto")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="results JSON (default: ./eval.json)")] = None,
    dtype: Dtype = "auto",
    ppl_text: Annotated[Optional[str], typer.Option(help="also: perplexity on this text (.txt/.jsonl/.parquet or HF name:config:split)")] = None,
    ppl_seq_len: Annotated[int, typer.Option(help="perplexity window, tokens")] = 512,
    ppl_stride: Annotated[Optional[int], typer.Option(help="perplexity stride (default: the window; non-overlapping)")] = None,
    ppl_tokens: Annotated[Optional[int], typer.Option(help="max tokens of --ppl-text")] = None,
    force: Annotated[bool, typer.Option(help="replace --out if it exists")] = False,
    trust_remote_code: TrustCode = False,
):
    """Zero-shot evaluation with lm-evaluation-harness (the paper's 8 tasks by default) and perplexity."""
    from .lmeval import run_eval

    result = run_eval(model, tasks, task_text, limit, batch_size, out, dtype, ppl_text, ppl_seq_len, ppl_stride,
                      ppl_tokens, force=force)
    table = Table(title=f"cdmoe eval: {model}")
    table.add_column("task")
    table.add_column("score", justify="right")
    for task, value in result["summary"].items():
        table.add_row(task, f"{value:.2f}")
    out_console.print(table)
    if "written_to" in result:
        out_console.print(f"wrote {result['written_to']}")


@app.command()
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
    force: Force = False,
    trust_remote_code: TrustCode = False,
):
    """Condense several N from one calibration and one greedy layer order; write each point and a report."""
    from .calibration import CalibSpec
    from .condense_run import EvalOptions
    from .search import SearchOptions
    from .sweep import sweep as run_sweep

    counts = _int_list(layers) or []
    report = run_sweep(model, out, counts,
                       SearchOptions(layers=max(counts, default=1), experts=_experts(experts, shared_only),
                                     metric=metric, final=final),
                       CalibSpec(calib, samples, seq_len, seed), EvalOptions(text=eval_text, max_tokens=eval_tokens),
                       dtype=dtype, force=force)
    _print_report(report, out / "report")


@app.command()
@_friendly
def measure(
    original: Annotated[Path, typer.Argument(help="original model directory")],
    condensed: Annotated[Path, typer.Argument(help="condensed output directory")],
    dtype: Annotated[str, typer.Option(help="dtype to load both in (or auto: the checkpoint's)")] = "float32",
    repeats: Annotated[int, typer.Option(help="fresh processes per model; the median peak is reported")] = 3,
    out: Annotated[Path, typer.Option(help="results JSON")] = Path("memory.json"),
    force: Annotated[bool, typer.Option(help="replace --out if it exists")] = False,
    trust_remote_code: TrustCode = False,
):
    """Measured memory: bytes on disk and peak RSS loading + running each model (fresh process each)."""
    from .measure import measure_memory
    from .output_dir import check_output_file, write_output_file

    if repeats < 1:
        raise CdmoeError(f"--repeats must be at least 1, got {repeats}")
    check_output_file(out, force, inputs=(original, condensed))
    result = measure_memory(original, condensed, dtype, repeats)
    write_output_file(out, json.dumps(result, indent=2) + "\n")
    table = Table(title="cdmoe measure")
    for col in ("", "original", "condensed", "ratio"):
        table.add_column(col, justify="right")
    for key, label in (("disk_bytes", "weights on disk"), ("load_bytes", "peak RSS after load"),
                       ("load_and_run_bytes", "peak RSS load + forward")):
        table.add_row(label, f"{result['original'][key] / 2**20:.1f} MiB", f"{result['condensed'][key] / 2**20:.1f} MiB",
                      f"{result['ratios'][key]:.3f}")
    out_console.print(table)
    out_console.print(f"wrote {out}")


@app.command()
@_friendly
def report(
    dirs: Annotated[list[Path], typer.Argument(help="cdmoe output directories")],
    out: Annotated[Path, typer.Option(help="where report.json and the plots go")] = Path("report"),
):
    """Gather condense records and evaluations of output directories into report.json and PNG plots."""
    from .report import build_report

    _print_report(build_report(dirs, out), out)


def _print_report(result: dict, out: Path) -> None:
    table = Table(title="cdmoe report")
    for col in ("directory", "N", "memory", "perplexity", "avg acc"):
        table.add_column(col, justify="right")
    for row in result["rows"]:
        ppl = f"{row['ppl']:.2f}" if row.get("ppl") else "-"
        acc = f"{row['average_accuracy']:.1f}" if row.get("average_accuracy") is not None else "-"
        table.add_row(Path(row["dir"]).name, str(len(row["layers"])), f"{100 * row['memory_ratio']:.1f}%", ppl, acc)
    out_console.print(table)
    out_console.print(f"wrote {out / 'report.json'} and {', '.join(result['plots'].values())}")


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
        table.add_row(f"perplexity ({ev['tokens']:,} held-out tokens)", f"{ev['original_ppl']:.2f}",
                      f"{ev['condensed_ppl']:.2f}")
        if "quantized_ppl" in ev:
            table.add_row(f"  then quantised ({record['quantization']['bits']}, from disk)", "", f"{ev['quantized_ppl']:.2f}")
        if "random_experts_ppl" in ev:
            table.add_row("  same layers, random experts", "", f"{ev['random_experts_ppl']:.2f}")
            table.add_row("  same layers dropped (Layer Drop)", "", f"{ev['dropped_layers_ppl']:.2f}")
    out_console.print(table)
    order = ", ".join(f"{layer} ({score:.4f})" for layer, score in zip(search["layer_order"], search["layer_step_scores"]))
    out_console.print(f"layers chosen (greedy order, {search['metric'].upper()} after each step): {order}")
    for c in record["condensed"]:
        kept = ", ".join(f"{e}:{g:.3f}" for e, g in zip(c["experts"], c["gates"])) or "shared experts only"
        out_console.print(f"  layer {c['layer']}: experts:gates {kept}")
    timings = search["timings"]
    out_console.print(f"search {timings['expert_search_s'] + timings['layer_search_s']:.1f}s, total "
                      f"{timings['total_s']:.1f}s; wrote {out} (record cdmoe.json, plots/single_layer_js.png)")


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
