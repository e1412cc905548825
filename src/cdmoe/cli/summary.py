"""What ``cdmoe condense`` prints when it is done: the condensed layers (``--layers``) or the plan (``--budget``)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from .options import out_console

__all__ = ["print_budget_summary", "print_summary", "size_text"]


def size_text(n: int) -> str:
    """Bytes as MiB, or GiB from 1 GiB up."""
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.2f} MiB"


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
        if "healed_ppl" in ev:
            table.add_row("  then healed (from disk)", "", f"{ev['healed_ppl']:.2f}")
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


def print_budget_summary(record: dict, out: Path) -> None:
    """What ``cdmoe condense --budget`` chose: bytes, the layers' actions and the steps."""
    budget, params = record["budget"], record["params"]
    table = Table(title="cdmoe condense --budget", show_header=True)
    for column, justify in (("", "left"), ("original", "right"), ("planned", "right")):
        table.add_column(column, justify=justify)
    table.add_row("weight bytes", f"{size_text(budget['original_bytes'])}",
                  f"{size_text(budget['written_bytes'])} ({100 * budget['written_bytes'] / budget['original_bytes']:.1f}%)")
    table.add_row("budget (a ceiling)", "", f"{size_text(budget['budget_bytes'])} ({100 * budget['ratio']:.1f}%)")
    table.add_row("parameters", f"{params['total_params']:,}", f"{params['condensed_params']:,}")
    table.add_row("activated params / token", f"{params['active_params']:,}", f"{params['condensed_active_params']:,}")
    out_console.print(table)
    actions = ", ".join(f"{layer}: {_label(a)}" for layer, a in record["layers"].items())
    out_console.print(f"per MoE layer: {actions}")
    steps = " -> ".join(f"{s['layer']}:{s['action']}" for s in record["steps"]) or "none (the original fits)"
    out_console.print(f"steps ({record['search']['metric'].upper()} of the final output after the last: "
                      f"{record['steps'][-1]['divergence'] if record['steps'] else 0.0:.4g}): {steps}")
    quantized = record.get("quantization")
    scheme = f", compressed-tensors {quantized['scheme']}" if quantized else ""
    out_console.print(f"wrote {out} ({'native' if record['native_format'] else 'cdmoe'} format{scheme}; record cdmoe.json)")


def _label(action: dict) -> str:
    kind = action["action"]
    if kind == "prune":
        return f"prune to {len(action['experts'])}"
    return f"condense K={len(action['experts'])}" if kind == "condense" else kind
