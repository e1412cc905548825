"""Which methods ``cdmoe compare`` knows, and the predicted memory ratio of every setting of each one's knob.

A method's knob is N (condensed or dropped layers, dropped blocks) or E' (experts per layer); the
ratio is predicted from the parameter accounting alone (:mod:`cdmoe.models.budget`), bf16 weights
against int8/int4/fp8 codes with their scales (:data:`SCHEME_BYTES`), so that
:func:`cdmoe.comparison.compare.compare` can pick, before anything is run, the largest setting that fits
each memory budget (a ceiling). The budget planner (``budget``) has no knob: its plan is made for each
budget, in its bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CdmoeError
from ..methods.baselines import EXPERT_METHODS, most_similar_first
from ..methods.msmoe import global_group_counts, usage_frequencies
from ..models.budget import ModelParams
from ..search.selectors import EXPERT_SELECTORS, LAYER_SELECTORS

__all__ = ["ABLATION_METHODS", "DEFAULT_METHODS", "Method", "candidate_ratios", "largest_fitting", "parse_methods"]


DEFAULT_METHODS = ("cd-moe", "cd-moe-s", "layer-drop", "block-drop", "expert-drop", "reap", "msmoe",
                   "msmoe-restricted", "slim-int8", "slim-int4", "cd-moe+int4", "layer-drop+int4")
ABLATION_METHODS = ("cd-moe:random", "cd-moe:l1", "cd-moe:pl-alpha-hill", "cd-moe:frequency", "cd-moe:layer-rank",
                    "cd-moe:global-layer-rank", "cd-moe:kl", "cd-moe:ppl")
INT4_BYTES, INT8_BYTES = 0.5 + 4 / 64, 1.0  # bytes per quantised weight (codes + scales), bitsandbytes
# compressed-tensors (fp32 scales): w8a8 one per row, w4a16 one per group of (at most) 128, fp8 one per block
SCHEME_BYTES = {"w8a8": 1.0, "w4a16": 0.5 + 4 / 128, "fp8": 1.0, "int8": INT8_BYTES, "int4": INT4_BYTES}


@dataclass(frozen=True)
class Method:
    name: str
    base: str  # cd-moe | layer-drop | block-drop | expert-drop | reap | msmoe | msmoe-restricted | slim | budget
    search: dict  # SearchOptions overrides of a cd-moe variant
    quantize: str | None = None
    heal: bool = False  # cd-moe+heal: the condensed layers healed after condensing (cdmoe heal)

    @property
    def knob(self) -> str:
        if self.base in EXPERT_METHODS:
            return "keep_experts"
        return {"cd-moe": "layers", "layer-drop": "layers", "block-drop": "layers", "budget": "budget"}.get(self.base,
                                                                                                          "none")


def parse_methods(text: str) -> list[Method]:
    names = {"default": DEFAULT_METHODS, "ablations": ABLATION_METHODS, "all": DEFAULT_METHODS + ABLATION_METHODS}
    out = []
    for item in [m.strip() for m in text.split(",") if m.strip()]:
        for name in names.get(item, (item,)):
            structural, *suffixes = name.split("+")
            heal = "heal" in suffixes
            bits = next((s for s in suffixes if s != "heal"), "")
            if structural.startswith("slim-"):
                structural, bits = "slim", structural.removeprefix("slim-")
            base, _, variant = structural.partition(":")
            search: dict = {}
            if base == "cd-moe-s":
                base, search = "cd-moe", {"experts": 0}
            if variant and base == "cd-moe":
                if variant in EXPERT_SELECTORS:
                    search = {**search, "expert_selector": variant}
                elif variant in LAYER_SELECTORS:
                    search = {**search, "layer_selector": variant}
                elif variant in ("js", "kl", "ppl"):
                    search = {**search, "metric": variant}
                else:
                    raise CdmoeError(f"unknown CD-MoE variant {variant!r} in --methods {name!r}")
            if base not in ("cd-moe", "layer-drop", "block-drop", "slim", "budget", *EXPERT_METHODS) or (
                    variant and base != "cd-moe"):
                raise CdmoeError(f"unknown method {name!r}; see `cdmoe compare --help` for the names")
            if bits in ("int8", "int4") and base == "budget":
                raise CdmoeError(f"{name!r}: the budget planner prices compressed-tensors outputs; use "
                                 "budget+w8a8, budget+w4a16 or budget+fp8")
            if bits and bits not in SCHEME_BYTES or len(suffixes) > 1:
                raise CdmoeError(f"unknown suffix {'+'.join(suffixes)!r} in {name!r}; use "
                                 f"+{', +'.join(SCHEME_BYTES)} or (CD-MoE, budget) +heal")
            if heal and base not in ("cd-moe", "budget"):
                raise CdmoeError(f"+heal trains condensed layers; {name!r} has none (use cd-moe+heal, cd-moe-s+heal or "
                                 "budget+heal)")
            out.append(Method(name, base, search, bits or None, heal))
    return out


def largest_fitting(cands: dict[int, float], budget: float) -> int | None:
    """The setting whose predicted ratio is the largest that does not exceed ``budget`` (ties: the lower
    setting), or None when even the smallest is over: a budget is a ceiling, never a target to get near."""
    fits = [knob for knob, ratio in cands.items() if ratio <= budget]
    return max(fits, key=lambda knob: (cands[knob], -knob)) if fits else None


def _bytes_ratio(params: ModelParams, total_after: int, targets: int, quantize: str | None,
                 routers: int | None = None) -> float:
    """Predicted weight bytes after / before (bf16). ``targets``: the weights bitsandbytes quantises
    (routed experts, condensed MLPs); compressed-tensors quantises every decoder-layer weight but
    the routers (``routers``: the remaining ones; default all), so its targets are the total less the
    embeddings, final norm and LM head and those routers."""
    if quantize is None:
        return total_after / params.total
    if quantize in ("w8a8", "w4a16", "fp8"):
        targets = total_after - params.non_layer - (sum(layer.other for layer in params.layers) if routers is None
                                                    else routers)
    per = SCHEME_BYTES[quantize]
    return ((total_after - targets) * 2 + targets * per) / (params.total * 2)


def candidate_ratios(method: Method, params: ModelParams, stats, top_k: int, num_experts: int) -> dict[int, float]:
    """Predicted memory ratio of every knob value of ``method``."""
    moe = params.moe_layer_ids
    experts_all = params.routed_total()
    if method.base == "cd-moe":
        k = method.search.get("experts", top_k)
        out = {}
        for n in range(1, len(moe) + 1):
            chosen = {i: k for i in moe[:n]}
            targets = experts_all - params.routed_total(moe[:n]) + sum(layer.condensed(k) for layer in params.layers[:n])
            out[n] = _bytes_ratio(params, params.condensed_total(chosen), targets, method.quantize,
                                  sum(layer.other for layer in params.layers[n:]))
        return out
    if method.base == "layer-drop":
        return {n: _bytes_ratio(params, params.layer_dropped_total(moe[:n]), experts_all - params.routed_total(moe[:n]),
                                method.quantize, sum(layer.other for layer in params.layers[n:]))
                for n in range(1, len(moe) + 1)}
    if method.base == "block-drop":
        ranked = most_similar_first(stats.block_cosine)
        return {n: _bytes_ratio(params, params.block_dropped_total(ranked[:n]), 0, None)
                for n in range(1, len(ranked))}
    if method.base == "msmoe":
        return _msmoe_candidates(method, params, stats, top_k, num_experts)
    if method.base in EXPERT_METHODS:
        return {e: _bytes_ratio(params, params.experts_reduced_total(e),
                                sum(e * layer.expert for layer in params.layers), method.quantize)
                for e in range(top_k, num_experts)}
    return {0: _bytes_ratio(params, params.total, experts_all, method.quantize)}


def _msmoe_candidates(method: Method, params: ModelParams, stats, top_k: int, num_experts: int) -> dict[int, float]:
    """Predicted ratio of M-SMoE for each average E' (E'_l from the global threshold, full routers kept)."""
    out = {}
    usage = usage_frequencies(stats)
    for e in range(top_k, num_experts):
        try:
            groups = global_group_counts(usage, e)
        except CdmoeError:  # E' too large for the threshold
            continue
        targets = sum(groups[layer.layer] * layer.expert for layer in params.layers)
        out[e] = _bytes_ratio(params, params.experts_merged_total(groups), targets, method.quantize)
    return out
