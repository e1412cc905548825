"""The model card (README.md) of a condensed checkpoint, generated from its record."""

from __future__ import annotations

__all__ = ["model_card"]


def _fmt(n: int | float | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


METHOD_TEXT = {
    "layer-drop": "Layer Drop (He et al., 2406.02500): the sparse MoE sub-layers listed in `cdmoe.json` were removed",
    "block-drop": "Block Drop (He et al., 2406.02500): the decoder layers listed in `cdmoe.json` were removed",
    "expert-drop": "Expert Drop: every MoE layer keeps the routed experts with the highest routing scores, router restricted to them",
    "reap": "REAP (Lasby et al., 2510.13999): every MoE layer keeps the routed experts with the highest mean gate x "
            "output norm over the calibration tokens routed to them, router restricted to them",
    "msmoe": "M-SMoE (Li et al., 2310.01334), as its reference code MC-SMoE runs it: each MoE layer's experts were merged "
             "into groups by routing-policy grouping, the number of groups per layer set by a global usage threshold; the "
             "full router is kept and every expert's id routes to its group's merged expert",
    "msmoe-restricted": "M-SMoE variant (Li et al., 2310.01334): every MoE layer's experts were merged into the same number "
                        "of groups by routing-policy grouping, router restricted to the dominant experts' rows",
    "slim": "Expert Slimming (2406.02500): the routed experts were quantised",
}


def _quantization_lines(record: dict) -> list[str]:
    q = record.get("quantization")
    if not q:
        return []
    if q["library"] == "compressed-tensors":
        acts = q["activations"]
        how = "activations unquantised" if acts is None else \
            f"activations {acts['type']}{acts['num_bits']} with a dynamic scale per {acts['strategy']}"
        return ["", "## Quantisation", "",
                f"Then {q['linear_modules']} linear modules (attention, MLPs, experts, condensed MLPs) were quantised "
                f"with compressed-tensors, scheme {q['scheme']} (preset {q['preset']}, format `{q['format']}`: weights "
                f"{q['weights']['type']}{q['weights']['num_bits']} per {q['weights']['strategy']}, round to nearest; "
                f"{how}); embeddings, norms, routers and the LM head are stored as the source stores them. It loads "
                "with `pip install compressed-tensors` in transformers and serves in vLLM (a cdmoe-format directory "
                "with the cdmoe vLLM plugin)."]
    return ["", "## Quantisation", "",
            f"Then the {q['targets']} were quantised with {q['library']} ({q['format']}, weight-only; "
            f"{q['linear_modules']} linear modules); other weights are stored in {q['stored_dtype']}. Loading needs "
            "`pip install bitsandbytes`."]


def _finetune_section(ft: dict | None) -> list[str]:
    """Model-card lines describing a ``cdmoe finetune`` run (none if the layers were not fine-tuned)."""
    if not ft:
        return []
    how = f"LoRA (r={ft['lora']['r']}, alpha={ft['lora']['alpha']}, merged)" if ft.get("lora") else "full weights"
    lines = [
        "", "## Fine-tuning", "",
        f"The condensed layers (only) were fine-tuned, {how}: {ft['trainable_params']:,} trainable parameters "
        f"({100 * ft['trainable_share']:.2f}% of the model), {ft['steps']} steps on `{ft['data']}` ({ft['format']}), "
        f"lr {ft['lr']:g}, {ft['schedule']} schedule with {100 * ft['warmup_ratio']:.0f}% warm-up; "
        f"final training loss {ft['final_loss']:.4f}.",
    ]
    ev = ft.get("evaluation")
    if ev:
        lines.append(f"Held-out perplexity ({ev['tokens']:,} tokens of `{ev['text']}`): {ev['ppl_before']:.2f} before, "
                     f"{ev['ppl_after']:.2f} after.")
    return lines


def _heal_section(heal: dict | None) -> list[str]:
    """Model-card lines saying the condensed layers' weights were trained by healing (none if not healed)."""
    if not heal:
        return []
    cal = heal["calibration"]
    lines = [
        "", "## Healing", "",
        "The condensed layers' weights were then trained (`cdmoe heal`, layer-local distillation): each condensed "
        f"MLP ({', '.join(heal['trained'])}), starting from the weights above, was trained in layer order to "
        "reproduce the original MoE block's output on the inputs this model sees at that layer (mean squared error, "
        f"Adam) on {cal['tokens_train']:,} calibration tokens of `{cal['source']}`, with {cal['tokens_val']:,} held-out "
        "tokens for early stopping. The fixed gates listed above are folded into the trained weights' starting point "
        "and no longer describe the layer exactly. Relative squared error of each layer's output "
        "(||f(X) - MoE(X)||² / ||MoE(X)||²):",
        "", "| layer | steps | train before | train after | held-out before | held-out after |", "|---|---|---|---|---|---|",
    ]
    for layer, fit in heal["layers"].items():
        b, a = fit["error_before"], fit["error_after"]
        lines.append(f"| {layer} | {fit['best_step']} of {fit['steps']} | {b['train']:.4f} | {a['train']:.4f} | "
                     f"{b['val']:.4f} | {a['val']:.4f} |")
    ev = heal.get("evaluation")
    if ev:
        lines += ["", f"Held-out perplexity ({ev['tokens']:,} tokens of `{ev['text']}`): {ev['ppl_before']:.2f} before "
                  f"healing, {ev['ppl_after']:.2f} after."]
    return lines


def model_card(record: dict) -> str:
    """Markdown model card with YAML front matter, from a ``cdmoe.json`` record."""
    if record.get("method", "cd-moe") in METHOD_TEXT:
        return _baseline_card(record)
    if record.get("method") == "budget":
        return _budget_card(record)
    base = record.get("base_model", "unknown")
    params = record.get("params", {})
    layers = record.get("condensed", [])
    search = record.get("search") or {}
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {base}",
        "tags: [cdmoe, mixture-of-experts, condensed, compression]",
        "---",
        "",
        f"# {base} condensed with cdmoe",
        "",
        f"This checkpoint is `{base}` with {len(layers)} sparse MoE layer(s) condensed by CD-MoE "
        "([arXiv 2412.00069](https://arxiv.org/abs/2412.00069)): each condensed layer keeps the shared experts plus "
        "the routed experts listed below with fixed gates (Eq. 2), applied to every token with no router (Eq. 3). "
        "Dropped experts and removed routers are not stored.",
        "",
        "| | original | condensed |",
        "|---|---|---|",
        f"| parameters | {_fmt(params.get('total_params'))} | {_fmt(params.get('condensed_params'))} |",
        f"| memory ratio | 100% | {100 * params.get('memory_ratio', float('nan')):.1f}% |",
        f"| activated parameters / token | {_fmt(params.get('active_params'))} | "
        f"{_fmt(params.get('condensed_active_params'))} |",
        "",
        "## Condensed layers",
        "",
        "| layer | kept routed experts | fixed gates |",
        "|---|---|---|",
    ]
    for layer in layers:
        gates = ", ".join(f"{g:.4f}" for g in layer["gates"])
        experts = ", ".join(map(str, layer["experts"])) or "(shared experts only)"
        lines.append(f"| {layer['layer']} | {experts} | {gates} |")
    if search:
        lines += ["", "## How they were chosen", ""]
        for key in ("method", "expert_selector", "layer_selector", "metric", "final_distribution", "calibration"):
            if key in search:
                lines.append(f"- {key.replace('_', ' ')}: `{search[key]}`")
    lines += _heal_section(record.get("heal"))
    lines += _finetune_section(record.get("finetune"))
    lines += _quantization_lines(record)
    lines += _loading_lines(record)
    return "\n".join(lines)


def _baseline_card(record: dict) -> str:
    base, params = record.get("base_model", "unknown"), record.get("params", {})
    lines = ["---", "library_name: transformers", f"base_model: {base}",
             "tags: [cdmoe, mixture-of-experts, compression, baseline]", "---", "",
             f"# {base}, {record['method']} (cdmoe baseline)", "",
             METHOD_TEXT[record["method"]] + ". Made for comparison with CD-MoE; see `cdmoe.json` for what was chosen.",
             "", "| | original | this checkpoint |", "|---|---|---|",
             f"| parameters | {_fmt(params.get('total_params'))} | {_fmt(params.get('condensed_params'))} |",
             f"| activated parameters / token | {_fmt(params.get('active_params'))} | "
             f"{_fmt(params.get('condensed_active_params'))} |"]
    lines += _quantization_lines(record)
    lines += _loading_lines(record)
    return "\n".join(lines)


def _budget_card(record: dict) -> str:
    base, params, budget = record.get("base_model", "unknown"), record.get("params", {}), record.get("budget")
    within = f" within {100 * budget['ratio']:g}% of its weight bytes" if budget else ""
    lines = ["---", "library_name: transformers", f"base_model: {base}",
             "tags: [cdmoe, mixture-of-experts, compression, budget-plan]", "---", "",
             f"# {base}{within} (cdmoe budget planner)", "",
             "Each sparse MoE layer was kept, pruned to its most salient routed experts (REAP, router restricted to "
             "them), condensed with CD-MoE ([arXiv 2412.00069](https://arxiv.org/abs/2412.00069): shared experts plus "
             "K routed experts with fixed gates, no router) or dropped, chosen greedily by the increase of the final "
             "output's divergence per byte saved; the steps are in `cdmoe.json`.", "",
             "| | original | this checkpoint |", "|---|---|---|"]
    if budget:
        lines.append(f"| weight bytes | {budget['original_bytes']:,} | {budget['predicted_bytes']:,} predicted "
                     f"(budget {budget['budget_bytes']:,}) |")
    lines += [f"| parameters | {_fmt(params.get('total_params'))} | {_fmt(params.get('condensed_params'))} |",
              f"| activated parameters / token | {_fmt(params.get('active_params'))} | "
              f"{_fmt(params.get('condensed_active_params'))} |", "", "| MoE layer | action |", "|---|---|"]
    for layer, action in record.get("layers", {}).items():
        experts = ", ".join(map(str, action.get("experts", [])))
        what = {"prune": f"pruned: routed experts {experts} kept",
                "condense": f"condensed: routed experts {experts}" if experts else "condensed: shared experts only"}
        lines.append(f"| {layer} | {what.get(action['action'], action['action'])} |")
    lines += _heal_section(record.get("heal"))
    lines += _finetune_section(record.get("finetune"))
    lines += _quantization_lines(record)
    lines += _loading_lines(record)
    return "\n".join(lines)


def _loading_lines(record: dict) -> list[str]:
    return [
        "",
        "## Loading",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/dir", trust_remote_code=True)',
        "# or, with cdmoe installed: import cdmoe; AutoModelForCausalLM.from_pretrained(path)",
        "```",
        "",
        f"Made with cdmoe {record.get('versions', {}).get('cdmoe', '')}; the full record is in `cdmoe.json`.",
        "",
    ]
