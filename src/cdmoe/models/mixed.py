"""One checkpoint for any mix of per-layer actions: keep, prune routed experts, condense (Eq. 3), drop.

A plan maps MoE layers to a :class:`LayerAction`:

- ``keep``: the sparse MoE block as it is;
- ``prune``: keep the routed experts ``experts`` (ascending original ids) and the router's rows for them
  (:func:`~cdmoe.models.modeling_cdmoe.prune_routed_experts`), so the family's own routing (score
  function, correction bias, group limits, renormalisation) runs over E_l experts: exactly the original
  block with the other experts' router logits at -inf;
- ``condense``: the shared experts plus the routed ``experts`` with fixed ``gates``, one standard
  :class:`~cdmoe.models.modeling_cdmoe.CondensedMLP` (Eq. 3), as ``cdmoe condense`` writes it;
- ``drop``: the MoE sub-layer adds nothing (Layer Drop's ``DroppedMLP``).

:func:`build_block` makes the module that would replace a layer's block and leaves the original
untouched (the planner swaps candidates in and out); :func:`apply_plan` makes a model the planned one,
in place, and picks the format: the family's own config where it expresses the result (no dropped
layer, and every MoE layer that stays sparse has one expert count, written as the family's count;
condensed layers as the family's dense layers where :func:`~cdmoe.models.condensed.condense_model`
can), else the cdmoe format with ``pruned_experts`` (per-layer counts), ``condensed_layers`` and
``dropped_layers`` in ``config.json``.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CdmoeError
from .adapter import MoEBlock, decoder_layers, family_spec, moe_blocks
from .condensed import LayerChoice, condense_model, fuse_condensed_mlp, to_cdmoe_format
from .modeling_cdmoe import DroppedMLP, prune_routed_experts

__all__ = ["KEEP", "LayerAction", "apply_plan", "build_block", "check_prune", "prune_sizes", "salient_experts"]

KINDS = ("keep", "prune", "condense", "drop")


@dataclass(frozen=True)
class LayerAction:
    """What becomes of one MoE layer. ``experts``: kept routed expert ids (prune: ascending; condense:
    in Algorithm 1's order); ``gates``: the fixed gates g_i of the condensed experts (Eq. 2)."""

    kind: str = "keep"
    experts: tuple[int, ...] = ()
    gates: tuple[float, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise CdmoeError(f"unknown layer action {self.kind!r}; use one of {', '.join(KINDS)}")
        if len(self.gates) != (len(self.experts) if self.kind == "condense" else 0):
            raise CdmoeError(f"a {self.kind} action has {len(self.experts)} experts and {len(self.gates)} gates")

    @property
    def label(self) -> str:
        """``keep``, ``prune-8`` (8 routed experts left), ``condense-2`` (K = 2) or ``drop``."""
        return f"{self.kind}-{len(self.experts)}" if self.kind in ("prune", "condense") else self.kind

    def to_dict(self) -> dict:
        out: dict = {"action": self.kind}
        if self.kind in ("prune", "condense"):
            out["experts"] = list(self.experts)
        if self.kind == "condense":
            out["gates"] = list(self.gates)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> LayerAction:
        return cls(data["action"], tuple(int(e) for e in data.get("experts", ())),
                   tuple(float(g) for g in data.get("gates", ())))


KEEP = LayerAction()


def prune_sizes(block: MoEBlock, fractions: tuple[float, ...]) -> tuple[list[int], str | None]:
    """The expert counts E_l (descending) the planner may prune ``block`` to, for ``fractions`` of E, and
    why some are left out (None when none is). E_l is at least top-k and below E. With group-limited
    routing (G groups) E_l is a multiple of G, pruned equally in every group, with at least the experts a
    group's score needs per group (2 for the top-2 sum, 1 for the max) and ``topk_group`` * E_l / G >= top-k."""
    num, top_k, groups = block.num_experts, block.top_k, block.routing_groups
    sizes = sorted({round(num * f / groups) * groups for f in fractions}, reverse=True)
    if groups == 1:
        return [s for s in sizes if top_k <= s < num], None
    per_group = 2 if block.spec.routing.group_score == "top2sum" else 1
    topk_group = int(getattr(block.config, "topk_group", groups) or groups)
    fits = [s for s in sizes if s < num and s // groups >= per_group and topk_group * (s // groups) >= top_k]
    why = (f"group-limited routing (n_group={groups}, topk_group={topk_group}): experts pruned equally in every "
           f"group, so E_l is a multiple of {groups} with >= {per_group} per group and topk_group * E_l / n_group "
           f">= top-k ({top_k})")
    return fits, why


def salient_experts(scores: torch.Tensor, size: int, groups: int = 1) -> tuple[int, ...]:
    """The ``size`` experts with the highest ``scores`` (E,) (ties: lower id), ascending; with ``groups`` > 1
    the best ``size / groups`` of each group of E / groups consecutive ids (group-limited routing)."""
    num = scores.numel()
    width, per = num // groups, size // groups

    def best(ids: range, n: int) -> list[int]:
        return sorted(ids, key=lambda e: (-float(scores[e]), e))[:n]

    return tuple(sorted(itertools.chain.from_iterable(best(range(g * width, (g + 1) * width), per)
                                                      for g in range(groups))))


def check_prune(block: MoEBlock, experts: tuple[int, ...]) -> None:
    """Refuse a prune action ``block``'s routing cannot run exactly (one line naming the fix)."""
    num, groups = block.num_experts, block.routing_groups
    where = f"layer {block.layer_idx}"
    if list(experts) != sorted(set(experts)) or any(not 0 <= e < num for e in experts):
        raise CdmoeError(f"{where}: pruned experts {list(experts)} must be distinct ascending ids in 0..{num - 1}")
    if not block.top_k <= len(experts) < num:
        raise CdmoeError(f"{where}: pruning keeps {len(experts)} experts; it needs top-k ({block.top_k}) <= E_l < {num}")
    counts = [sum(1 for e in experts if e // (num // groups) == g) for g in range(groups)]
    if groups > 1 and len(set(counts)) != 1:
        raise CdmoeError(f"{where}: group-limited routing needs the same number of experts kept in each of its "
                         f"{groups} groups, got {counts}")


def pruned_copy(block: MoEBlock, experts: tuple[int, ...]) -> nn.Module:
    """A copy of ``block``'s module keeping routed ``experts`` and their router rows; the original is
    unchanged and no tensor is copied except the kept rows (the others are shared)."""
    module = block.module
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    memo[id(block.config)] = block.config
    new = copy.deepcopy(module, memo)
    prune_routed_experts(new, block.spec.experts_attr, block.spec.router_attr, experts)
    return new


def build_block(block: MoEBlock, action: LayerAction) -> nn.Module | None:
    """The module that replaces ``block`` under ``action`` (None for keep: the block itself)."""
    if action.kind == "keep":
        return None
    if action.kind == "drop":
        return DroppedMLP()
    if action.kind == "condense":
        return fuse_condensed_mlp(block, action.experts, action.gates)
    check_prune(block, action.experts)
    return pruned_copy(block, action.experts)


def _count_key(config, spec) -> str:
    key = next((k for k in spec.num_experts_keys if getattr(config, k, None) is not None), None)
    if key is None:
        raise CdmoeError(f"cannot find the expert count in the config (looked for {', '.join(spec.num_experts_keys)})")
    return key


@torch.no_grad()
def apply_plan(model: nn.Module, plan: dict[int, LayerAction]) -> nn.Module:
    """Make ``model`` the planned model, in place (see the module docstring for the format chosen).

    ``plan``: {MoE layer: action}; layers not named are kept. Returns the same model object.
    """
    spec = family_spec(model)
    if getattr(model.config, "cdmoe", None):
        raise CdmoeError("this model is already condensed; plan on the original model instead")
    blocks = {b.layer_idx: b for b in moe_blocks(model, spec)}
    bad = sorted(set(plan) - set(blocks))
    if bad:
        raise CdmoeError(f"layers {bad} are not sparse MoE layers; MoE layers are {sorted(blocks)}")
    acts = {layer: a for layer, a in sorted(plan.items()) if a.kind != "keep"}
    for layer, action in acts.items():
        if action.kind == "prune":
            check_prune(blocks[layer], action.experts)
    sparse = {layer: len(acts[layer].experts) if layer in acts else b.num_experts for layer, b in blocks.items()
              if acts.get(layer, KEEP).kind in ("keep", "prune")}
    pruned = {layer: a for layer, a in acts.items() if a.kind == "prune"}
    uniform = bool(pruned) and len(set(sparse.values())) == 1
    layers = decoder_layers(model, spec)
    for layer, action in acts.items():
        if action.kind == "prune":
            prune_routed_experts(blocks[layer].module, spec.experts_attr, spec.router_attr, action.experts)
        elif action.kind == "drop":
            setattr(layers[layer], spec.block_attr, DroppedMLP())
    entries: dict = {}
    if uniform:  # every sparse layer has E': the family's own expert count says so
        setattr(model.config, _count_key(model.config, spec), next(iter(sparse.values())))
    elif pruned:
        entries = {"router_attr": spec.router_attr,
                   "pruned_experts": {str(layer): {"num_experts": len(a.experts)} for layer, a in pruned.items()}}
    dropped = [layer for layer, a in acts.items() if a.kind == "drop"]
    if dropped:
        entries["dropped_layers"] = dropped
    if entries:
        to_cdmoe_format(model, entries)
    choices = [LayerChoice(layer, a.experts, a.gates) for layer, a in acts.items() if a.kind == "condense"]
    if choices:
        condense_model(model, choices)  # the family's dense layers where its config can express them
    return model
