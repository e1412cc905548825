"""``cdmoe report DIR...``: one JSON and a few PNG plots over condensed output directories.

Reads each directory's ``cdmoe.json`` (the condense record), and when present its
``eval.json`` (``cdmoe eval``), ``memory.json`` (``cdmoe measure``) and ``speed.json``
(``benchmarks/inference_speed.py --json``).
Plots: quality vs memory ratio and vs speed-up (the paper's Figure 3; quality is the
average lm-eval accuracy if evaluated, else held-out perplexity), single-layer divergence
per MoE layer (Figure 2), and the experts kept per condensed layer with their gates.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint.record import read_record
from ..errors import CdmoeError
from ..evaluation.plots import _pyplot, plot_single_layer_scores
from ..io.output_dir import atomic_output_dir
from ..models.input_checks import read_json_object

__all__ = ["collect", "build_report", "write_report"]


def _read(path: Path) -> dict | None:
    return read_json_object(path, "rerun the command that wrote it") if path.exists() else None


def collect(directory: str | Path) -> dict:
    """One report row from an output directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CdmoeError(f"{directory} is not a directory; pass cdmoe output directories")
    record = read_record(directory, condensed=True)
    evaluation = _read(directory / "eval.json") or {}
    speed = _read(directory / "speed.json") or {}
    memory = _read(directory / "memory.json") or {}
    summary = evaluation.get("summary", {})
    accuracies = [v for k, v in summary.items() if "ppl" not in k and "perplexity" not in k]
    held_out = record.get("evaluation", {})
    return {
        "dir": str(directory),
        "layers": [c["layer"] for c in record["condensed"]],
        "experts_per_layer": [len(c["experts"]) for c in record["condensed"]],
        "memory_ratio": record["params"]["memory_ratio"],
        "condensed_params": record["params"]["condensed_params"],
        "active_params": record["params"]["condensed_active_params"],
        "original_ppl": held_out.get("original_ppl"),
        "ppl": held_out.get("condensed_ppl"),
        "tasks": summary,
        "average_accuracy": sum(accuracies) / len(accuracies) if accuracies else None,
        "speedup": speed.get("speedup"),
        "measured_memory_ratios": memory.get("ratios"),
        "search": record.get("search", {}),
        "condensed": record["condensed"],
    }


def _quality(rows: list[dict]) -> tuple[str, list[float | None], float | None]:
    if all(r["average_accuracy"] is not None for r in rows):
        return "average accuracy (%)", [r["average_accuracy"] for r in rows], None
    originals = [r["original_ppl"] for r in rows if r["original_ppl"]]
    return "held-out perplexity", [r["ppl"] for r in rows], (originals[0] if originals else None)


def _plot_quality(rows: list[dict], x_key: str, xlabel: str, path: Path) -> Path | None:
    label, ys, baseline = _quality(rows)
    xs = [r[x_key] if x_key != "speedup" else (r["speedup"] or {}).get("prefill") for r in rows]
    points = [(x, y, r) for x, y, r in zip(xs, ys, rows) if x is not None and y is not None]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    points.sort(key=lambda p: len(p[2]["layers"]))  # connect the points in order of N, not of x
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label="CD-MoE (condensed), in order of N")
    for x, y, r in points:
        ax.annotate(f"N={len(r['layers'])}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle=":", label="original model")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(label)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_experts(row: dict, path: Path) -> Path:
    plt = _pyplot()
    layers = sorted(row["condensed"], key=lambda c: c["layer"])
    n_experts = max(len(row["search"].get("expert_search", {}).get(str(c["layer"]), {}).get("all_gates", [])) or
                    (max(c["experts"], default=0) + 1) for c in layers)
    grid = [[0.0] * n_experts for _ in layers]
    for i, c in enumerate(layers):
        for e, g in zip(c["experts"], c["gates"]):
            grid[i][e] = g
    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * n_experts + 2), 0.45 * len(layers) + 1.8), dpi=120)
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(layers)), [str(c["layer"]) for c in layers])
    ax.set_xticks(range(n_experts))
    ax.set_xlabel("routed expert")
    ax.set_ylabel("condensed layer")
    ax.set_title("Kept experts and their fixed gates (Eq. 2)")
    fig.colorbar(image, ax=ax, label="gate")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def build_report(directories: list[str | Path], out: str | Path) -> dict:
    """Write ``report.json`` and PNG plots for ``directories`` into the directory ``out`` (created); return the report.
    (A command writing a report on its own goes through :func:`write_report`.)"""
    if not directories:
        raise CdmoeError("pass at least one cdmoe output directory")
    rows = sorted((collect(d) for d in directories), key=lambda r: -r["memory_ratio"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = {}
    made = _plot_quality(rows, "memory_ratio", "memory ratio (condensed / original parameters)",
                         out / "quality_vs_memory.png")
    if made:
        plots["quality_vs_memory"] = made.name
    made = _plot_quality(rows, "speedup", "prefill speed-up (x)", out / "quality_vs_speedup.png")
    if made:
        plots["quality_vs_speedup"] = made.name
    largest = max(rows, key=lambda r: len(r["layers"]))
    if largest["search"].get("single_layer_scores"):
        plots["single_layer_js"] = plot_single_layer_scores(largest["search"], out / "single_layer_js.png").name
    plots["experts"] = _plot_experts(largest, out / "experts.png").name
    report = {"rows": [{k: v for k, v in r.items() if k not in ("search", "condensed")} for r in rows],
              "plots": plots}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def write_report(directories: list[str | Path], out: str | Path, force: bool = False) -> dict:
    """``cdmoe report``: :func:`build_report` into the output directory ``out`` (atomically; never into or
    around the directories read, and an earlier report replaced only with ``force``)."""
    if not directories:
        raise CdmoeError("pass at least one cdmoe output directory")
    with atomic_output_dir(out, force, inputs=directories) as work:
        return build_report(directories, work)
