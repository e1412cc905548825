"""MoE family specs: what cdmoe knows about each family, as data.

One :class:`FamilySpec` per family says where the MoE block, router, experts and shared
experts live and how the router turns logits into the top-k indices and gate values
g_{i,t} of Eq. 1. The maths is checked in ``tests/test_adapter.py`` against each family's
own MoE block (transformers 5.23). Algorithms never look at family names: they read a
spec. A model whose ``model_type`` is not listed but whose decoder layers hold a block
with ``gate``/``experts`` (and optionally ``shared_experts``) is probed structurally and
gets a spec built from its config keys (:func:`probe_spec`), which is how remote-code
checkpoints such as DeepSeekMoE-16B (``model_type: deepseek``) are handled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["RoutingSpec", "FamilySpec", "FAMILIES", "spec_for_model_type", "probe_spec", "supported_model_types"]


@dataclass(frozen=True)
class RoutingSpec:
    """How a router maps logits (T, E) to top-k indices and gates g_{i,t}.

    scores = score_fn(router logits); choice = scores (+ correction bias); optionally
    keep only the ``topk_group`` best of ``n_group`` expert groups; S = top-K(choice);
    g = scores[S], renormalised over S when ``renormalize`` says so, times the routed
    scaling factor.
    """

    score: Literal["softmax", "sigmoid"] = "softmax"
    logits_fp32: bool = False  # the router casts x and W to fp32 before the matmul
    correction_bias: str | None = None  # attribute path under the router; used for choice only
    group_score: Literal["max", "top2sum"] | None = None
    group_when: tuple[str, str] | None = None  # (config key, value) that switches group limiting on
    renormalize: Literal["always", "never", "config"] = "never"  # "config": read norm_topk_prob
    renorm_eps: float = 0.0
    renorm_min_key: str | None = None  # config key of a clamp-min on the denominator
    scaling_key: str | None = None  # config key of the routed scaling factor


@dataclass(frozen=True)
class FamilySpec:
    """Where things are in one MoE family and which config keys size them."""

    model_types: tuple[str, ...]
    routing: RoutingSpec
    block_attr: str = "mlp"
    router_attr: str = "gate"
    router_weight: str = "weight"  # attribute path under the router
    experts_attr: str = "experts"
    shared_attr: str | None = None
    shared_gate_attr: str | None = None  # per-token sigmoid gate on the shared expert
    layers_path: str = "model.layers"
    final_norm: str = "model.norm"
    residual_scale_key: str | None = None  # config key scaling the block output before the residual add
    top_k_key: str = "num_experts_per_tok"
    num_experts_keys: tuple[str, ...] = ("n_routed_experts", "num_experts", "num_local_experts")
    expert_intermediate_key: str = "moe_intermediate_size"
    # how a family can mark a layer dense natively: ("list", key) for an arbitrary set,
    # ("prefix", key) for a leading run of layers; None when it cannot
    dense_rule: tuple[str, str] | None = None
    notes: str = ""

    @property
    def name(self) -> str:
        return self.model_types[0]


_SOFTMAX_CFG = RoutingSpec(score="softmax", renormalize="config")
_DSV3 = RoutingSpec(
    score="sigmoid",
    logits_fp32=True,
    correction_bias="e_score_correction_bias",
    group_score="top2sum",
    renormalize="config",
    renorm_eps=1e-20,
    scaling_key="routed_scaling_factor",
)

FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(
        ("deepseek_v2",),
        RoutingSpec(
            score="softmax",
            logits_fp32=True,
            group_score="max",
            group_when=("topk_method", "group_limited_greedy"),
            scaling_key="routed_scaling_factor",
        ),
        shared_attr="shared_experts",
        dense_rule=("prefix", "first_k_dense_replace"),
        notes="norm_topk_prob is ignored by the library",
    ),
    FamilySpec(("deepseek_v3", "glm4_moe", "dots1"), _DSV3, shared_attr="shared_experts",
               dense_rule=("prefix", "first_k_dense_replace")),
    FamilySpec(
        ("qwen2_moe",), _SOFTMAX_CFG, shared_attr="shared_expert", shared_gate_attr="shared_expert_gate",
        num_experts_keys=("num_experts",), dense_rule=("list", "mlp_only_layers"),
    ),
    FamilySpec(("qwen3_moe",), _SOFTMAX_CFG, num_experts_keys=("num_experts",), dense_rule=("list", "mlp_only_layers")),
    FamilySpec(("olmoe",), _SOFTMAX_CFG, num_experts_keys=("num_experts",), expert_intermediate_key="intermediate_size"),
    FamilySpec(
        ("mixtral",), RoutingSpec(score="softmax", renormalize="always"),
        num_experts_keys=("num_local_experts",), expert_intermediate_key="intermediate_size",
    ),
    FamilySpec(
        ("granitemoe",), RoutingSpec(score="softmax", renormalize="always"),
        block_attr="block_sparse_moe", router_attr="router", num_experts_keys=("num_local_experts",),
        residual_scale_key="residual_multiplier",
        expert_intermediate_key="intermediate_size", notes="top-k on logits then softmax over K == renormalised softmax",
    ),
    FamilySpec(
        ("hunyuan_v1_moe",), RoutingSpec(score="softmax", logits_fp32=True, renormalize="always"),
        router_weight="wg.weight", shared_attr="shared_mlp", top_k_key="moe_topk",
        num_experts_keys=("num_experts",), expert_intermediate_key="intermediate_size",
    ),
    FamilySpec(
        ("ernie4_5_moe",),
        RoutingSpec(score="softmax", logits_fp32=True, correction_bias="moe_statics.e_score_correction_bias",
                    renormalize="always", renorm_min_key="moe_norm_min"),
        shared_attr="shared_experts", num_experts_keys=("moe_num_experts", "num_experts"),
    ),
    FamilySpec(
        ("deepseek",),  # DeepSeekMoE-16B, remote code, one module per expert
        RoutingSpec(score="softmax", renormalize="config"),
        shared_attr="shared_experts",
    ),
)

_BY_TYPE = {t: spec for spec in FAMILIES for t in spec.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_TYPE)


def spec_for_model_type(model_type: str) -> FamilySpec | None:
    return _BY_TYPE.get(model_type)


def probe_spec(config, block) -> FamilySpec | None:
    """Build a spec for an unlisted family from the block's structure and config keys.

    Accepts a block with a router (``gate`` or ``router``) holding a ``weight`` [E, H], an
    ``experts`` container (fused 3-D tensors or one module per expert) and optionally
    ``shared_experts``/``shared_expert``. Routing follows the DeepSeek-style config keys
    (``scoring_func``, ``topk_method``, ``norm_topk_prob``, ``routed_scaling_factor``).
    """
    router_attr = next((a for a in ("gate", "router") if hasattr(block, a)), None)
    if router_attr is None or not hasattr(block, "experts") or not hasattr(getattr(block, router_attr), "weight"):
        return None
    shared = next((a for a in ("shared_experts", "shared_expert") if getattr(block, a, None) is not None), None)
    sigmoid = getattr(config, "scoring_func", "softmax") == "sigmoid"
    router = getattr(block, router_attr)
    bias = "e_score_correction_bias" if getattr(router, "e_score_correction_bias", None) is not None else None
    routing = RoutingSpec(
        score="sigmoid" if sigmoid else "softmax",
        correction_bias=bias,
        group_score=("top2sum" if sigmoid else "max") if getattr(config, "n_group", 1) not in (None, 1) else None,
        group_when=None if sigmoid else ("topk_method", "group_limited_greedy"),
        renormalize="config",
        renorm_eps=1e-20 if sigmoid else 0.0,
        scaling_key="routed_scaling_factor" if hasattr(config, "routed_scaling_factor") else None,
    )
    return FamilySpec((config.model_type,), routing, router_attr=router_attr, shared_attr=shared,
                      notes="probed from structure and config keys")
