"""Literal Algorithms 1 and 2 (as the paper writes them and the official code runs them):
every candidate is evaluated with a full model forward pass. Slow; for tests only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cdmoe.methods.ablations import swapped_blocks
from cdmoe.models.adapter import decoder_layers, family_spec, moe_blocks
from cdmoe.models.condensed import fuse_condensed_mlp


def js_mean(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over tokens of JS(softmax(p), softmax(q)), written independently of cdmoe.search.metrics."""
    p = F.softmax(p_logits.double().reshape(-1, p_logits.shape[-1]), -1)
    q = F.softmax(q_logits.double().reshape(-1, q_logits.shape[-1]), -1)
    m = 0.5 * (p + q)
    kl_pm = (p * (p.log() - m.log())).sum(-1)
    kl_qm = (q * (q.log() - m.log())).sum(-1)
    return float((0.5 * (kl_pm + kl_qm)).mean())


@torch.no_grad()
def recorded_gates(model, ids, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 from the library router's own outputs (not cdmoe's routing): (gates (E,), counts (E,))."""
    block = next(b for b in moe_blocks(model) if b.layer_idx == layer)
    seen = []
    hook = block.router.register_forward_hook(lambda m, i, o: seen.append(o))
    model(input_ids=ids)
    hook.remove()
    weights = torch.cat([o[-2].float().reshape(-1, o[-2].shape[-1]) for o in seen])
    indices = torch.cat([o[-1].reshape(-1, o[-1].shape[-1]) for o in seen])
    gates, counts = torch.zeros(block.num_experts), torch.zeros(block.num_experts, dtype=torch.long)
    for e in range(block.num_experts):
        mask = indices == e
        counts[e] = int(mask.sum())
        gates[e] = weights[mask].mean() if counts[e] else float("nan")
    # documented fallback for an expert no token selected: the layer's mean selected gate
    gates[counts == 0] = weights.mean()
    return gates, counts


@torch.no_grad()
def layer_output(model, ids, layer: int) -> torch.Tensor:
    """Decoder layer ``layer``'s output in a full forward pass (hooked: HF's ``hidden_states[-1]``
    is the final-normed state, not the last layer's output)."""
    seen = []
    layers = decoder_layers(model, family_spec(model))
    hook = layers[layer].register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
    model(input_ids=ids)
    hook.remove()
    return seen[0]


@torch.no_grad()
def naive_experts(model, ids, layer: int, k: int, gates: torch.Tensor) -> list[int]:
    """Algorithm 1: a full model pass per candidate; compares that decoder layer's output."""
    block = next(b for b in moe_blocks(model) if b.layer_idx == layer)
    ref = layer_output(model, ids, layer)
    chosen: list[int] = []
    for _ in range(k):
        losses = {}
        for e in range(block.num_experts):
            if e in chosen:
                continue
            keep = chosen + [e]
            mlp = fuse_condensed_mlp(block, tuple(keep), tuple(float(gates[i]) for i in keep))
            with swapped_blocks(model, {layer: mlp}):
                out = layer_output(model, ids, layer)
            losses[e] = js_mean(ref, out)
        chosen.append(min(losses, key=losses.get))
    return chosen


@torch.no_grad()
def kl_mean(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over tokens of KL(softmax(p) || softmax(q)), in float64."""
    p = F.log_softmax(p_logits.double().reshape(-1, p_logits.shape[-1]), -1)
    q = F.log_softmax(q_logits.double().reshape(-1, q_logits.shape[-1]), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def sample_ppl(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B,) perplexity of each sample over its own next-token predictions, in float64."""
    logp = F.log_softmax(logits.double()[:, :-1], -1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return nll.mean(1).exp()


def naive_layer_search(model, ids, condensed: dict, n: int, final: str = "hidden",
                       metric: str = "js") -> tuple[list[int], list[float]]:
    """Algorithm 2: a full model pass per candidate layer set; compares the final output.

    ``metric``: js | kl on the final output (``final``: normed hidden state or logits), or ppl (the
    mean over samples of |PPL change| on the logits, Sec. 4.4). Returns the order and each step's score."""

    def output():
        if final == "hidden" and metric != "ppl":
            return model.model(input_ids=ids).last_hidden_state
        return model(input_ids=ids).logits

    def loss(ref, out):
        if metric == "ppl":
            return float((sample_ppl(out, ids) - sample_ppl(ref, ids)).abs().mean())
        return (kl_mean if metric == "kl" else js_mean)(ref, out)

    with torch.no_grad():
        ref = output()
        chosen: list[int] = []
        scores: list[float] = []
        for _ in range(n):
            losses = {}
            for layer in condensed:
                if layer in chosen:
                    continue
                with swapped_blocks(model, {i: condensed[i] for i in chosen + [layer]}):
                    losses[layer] = loss(ref, output())
            best = min(losses, key=losses.get)
            chosen.append(best)
            scores.append(losses[best])
    return chosen, scores


def naive_layers(model, ids, condensed: dict, n: int, final: str = "hidden") -> list[int]:
    """Algorithm 2's order (JS), see :func:`naive_layer_search`."""
    return naive_layer_search(model, ids, condensed, n, final)[0]


def naive_next_rungs(ladder: list[dict], i: int) -> list[int]:
    """The planner's moves, as its docstring states them: from keep or a prune rung, the next prune rung and
    the first condense-or-drop rung with fewer bytes; from a condense rung, the next rung."""
    kinds = [r["action"] for r in ladder]
    if kinds[i] in ("condense", "drop"):
        return [i + 1] if i + 1 < len(ladder) else []
    out = [i + 1] if kinds[i + 1] == "prune" else []
    return out + [next(j for j in range(i + 1, len(ladder)) if kinds[j] in ("condense", "drop")
                       and ladder[j]["bytes"] < ladder[i]["bytes"])]


@torch.no_grad()
def naive_budget_plan(model, ids, ladders: dict[int, list[dict]], fixed: int, budget: int,
                      final: str = "hidden") -> list[tuple[int, int, float]]:
    """The budget planner with a full model pass per candidate: each candidate's model has every layer at its
    current rung and the candidate's layer at the candidate rung (modules built from the original blocks),
    scored by JS of the final output; the smallest (JS - current JS) / bytes saved is taken, unless the
    smallest-JS candidate that meets ``budget`` has no more JS than it (then it ends the plan).
    ``ladders``: {layer: [{"action", "experts", "gates", "bytes"}]}. Returns [(layer, rung, JS)] of the plan."""
    from cdmoe.models.mixed import LayerAction, build_block

    blocks = {b.layer_idx: b for b in moe_blocks(model)}
    action = {layer: [LayerAction.from_dict(r) for r in rungs] for layer, rungs in ladders.items()}

    def output():
        return model.model(input_ids=ids).last_hidden_state if final == "hidden" else model(input_ids=ids).logits

    ref = output()
    state = {layer: 0 for layer in ladders}
    plan: list[tuple[int, int, float]] = []
    current = 0.0
    while True:
        total = fixed + sum(ladders[layer][i]["bytes"] for layer, i in state.items())
        if total <= budget:
            return plan
        cands = []
        for layer in sorted(ladders):
            for j in naive_next_rungs(ladders[layer], state[layer]):
                rungs = {**state, layer: j}
                modules = {m: build_block(blocks[m], action[m][i]) for m, i in rungs.items() if i}
                with swapped_blocks(model, modules):
                    js = js_mean(ref, output())
                saved = ladders[layer][state[layer]]["bytes"] - ladders[layer][j]["bytes"]
                cands.append(((js - current) / saved, layer, j, js, total - saved))
        best = min(cands)
        fits = [c for c in cands if c[4] <= budget]
        done = min(fits, key=lambda c: (c[3], c[1], c[2])) if fits else None
        if done is not None and done[3] <= best[3]:
            return plan + [(done[1], done[2], done[3])]
        state[best[1]] = best[2]
        plan.append((best[1], best[2], best[3]))
        current = best[3]


@torch.no_grad()
def restricted_routing(fn, kept: dict[int, list[int]], blocks, monkeypatch):
    """``fn()`` with the router of every block in ``blocks`` listed in ``kept`` ({layer: kept expert ids})
    restricted to those rows: the other experts' router logits (and correction bias) at -inf, through the
    family's own code (``F.linear`` patched for those router weights only); the biases are restored after."""
    masks, saved = {}, []
    for block in blocks:
        if block.layer_idx not in kept:
            continue
        mask = torch.full((block.num_experts,), float("-inf"))
        mask[kept[block.layer_idx]] = 0.0
        masks[block.router_weight.data_ptr()] = mask
        bias = getattr(block.router, "e_score_correction_bias", None)
        if bias is not None:
            saved.append((bias, bias.clone()))
            bias += mask
    linear = F.linear

    def routed_linear(x, weight, bias=None):
        out = linear(x, weight, bias)
        return out + masks[weight.data_ptr()].to(out.dtype) if weight.data_ptr() in masks else out

    monkeypatch.setattr(F, "linear", routed_linear)
    try:
        return fn()
    finally:
        monkeypatch.setattr(F, "linear", linear)
        for bias, value in saved:
            bias.copy_(value)
