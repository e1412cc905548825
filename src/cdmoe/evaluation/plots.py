"""PNG plots of a condense run (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_single_layer_scores"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_single_layer_scores(search: dict, path: str | Path, title: str = "") -> Path:
    """The paper's Figure 2: divergence of the final output when one MoE layer alone is condensed.

    Layers chosen by the greedy search are marked with their step number.
    """
    plt = _pyplot()
    scores = {int(k): v for k, v in search["single_layer_scores"].items()}
    layers = sorted(scores)
    order = {layer: i + 1 for i, layer in enumerate(search["layer_order"])}
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(layers) + 2), 3.6), dpi=120)
    colors = ["tab:orange" if layer in order else "tab:blue" for layer in layers]
    ax.bar([str(x) for x in layers], [scores[x] for x in layers], color=colors)
    for i, layer in enumerate(layers):
        if layer in order:
            ax.annotate(f"#{order[layer]}", (i, scores[layer]), ha="center", va="bottom", fontsize=8)
    metric = search.get("metric", "js").upper()
    ax.set_xlabel("MoE layer condensed alone")
    ax.set_ylabel(f"{metric} of final output ({search.get('final_distribution', 'hidden')})")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="tab:orange", label="chosen (#greedy step)"), Patch(color="tab:blue", label="not chosen")],
              fontsize=8, loc="lower right")
    ax.set_title(title or "Single-layer condensing")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
