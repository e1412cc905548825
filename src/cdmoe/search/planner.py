"""The budget planner's greedy search (issue #26): per MoE layer keep, prune, condense or drop, chosen as
Algorithm 2 chooses layers, by the increase of the final-output divergence per byte saved.

Each MoE layer has a *ladder* of actions (:class:`Ladder`)::

    keep, prune to E_l (REAP saliency; E_l descending, e.g. 3/4, 1/2, 1/4 of E),
    condense K = top-k, ..., K_min (shared experts + the first K of Algorithm 1's greedy order, so each is a
    prefix of the one before; K_min = 0 with shared experts, else 1), drop

From keep or a prune rung a layer may move to the next prune rung or to the first condense (or drop)
rung with fewer bytes than its current one; from a condense rung to the next one (K - 1, then drop).
A step scores every (layer, next rung) candidate by the divergence of the model's final output
(:func:`~cdmoe.search.layer_search.score_outputs`, Algorithm 2's measure) re-running only from the
candidate's layer on the cached inputs (sequential mode: all candidates in one pass over the layers,
:meth:`~cdmoe.search.runner.LayerRunner.run_streams`), and takes the candidate with the smallest
(divergence - current divergence) / bytes saved (ties: the lower layer, then the lower rung). The inputs
behind the changed layer are then refreshed; the layer stays a candidate with its next rungs. A step
costs about one Algorithm 2 step: up to two candidates per layer where Algorithm 2 has one.

Budgets are ceilings in bytes. At every step, for each budget not met yet: among the candidates that
would meet it, the one of smallest divergence (ties as above) ends that budget's plan if its divergence
is no larger than the ratio-chosen candidate's (going on could only add divergence); else the search
continues. One run serves several budgets: each plan is a prefix of the path plus its final candidate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import CdmoeError
from ..models.mixed import LayerAction
from .layer_search import final_divergence, passes_from, score_outputs
from .runner import LayerRunner

__all__ = ["Ladder", "PlanProgress", "Rung", "greedy_plan", "plan_of_steps"]


@dataclass(frozen=True)
class Rung:
    action: LayerAction
    bytes: int  # the layer's predicted bytes under ``action`` (tensors + header bound)


@dataclass
class Ladder:
    """One MoE layer's actions: ``rungs`` = [keep, ``prunes`` prune rungs, condense rungs, drop]."""

    layer: int
    rungs: list[Rung]
    prunes: int

    def next(self, i: int) -> list[int]:
        """The rungs a layer at rung ``i`` may move to in one step."""
        tail = 1 + self.prunes  # first condense rung
        if i >= tail:
            return [i + 1] if i + 1 < len(self.rungs) else []
        cheaper = next(j for j in range(tail, len(self.rungs)) if self.rungs[j].bytes < self.rungs[i].bytes)
        return ([i + 1] if i + 1 < tail else []) + [cheaper]

    def to_dict(self) -> list[dict]:
        return [{"label": r.action.label, "bytes": r.bytes, **r.action.to_dict()} for r in self.rungs]


@dataclass
class PlanProgress:
    """The search so far: ``steps`` taken ({layer, rung, action, divergence, bytes, saved_bytes, score}),
    each finished step's ``candidates``, the current step's scores (``pending``, "layer:rung" -> divergence)
    and, per budget met (str of its bytes), the steps of its plan (``finals``)."""

    steps: list[dict] = field(default_factory=list)
    candidates: list[list[dict]] = field(default_factory=list)
    pending: dict[str, float] = field(default_factory=dict)
    finals: dict[str, list[dict]] = field(default_factory=dict)
    layer_passes: int = 0  # decoder-layer forward passes over one calibration batch


def plan_of_steps(ladders: dict[int, Ladder], steps: list[dict]) -> dict[int, LayerAction]:
    """{MoE layer: its action} after ``steps`` (layers never stepped are kept)."""
    rung = {layer: 0 for layer in ladders}
    for step in steps:
        rung[step["layer"]] = step["rung"]
    return {layer: ladders[layer].rungs[i].action for layer, i in rung.items()}


def _key(layer: int, rung: int) -> str:
    return f"{layer}:{rung}"


@torch.no_grad()
def greedy_plan(
    runner: LayerRunner,
    ladders: dict[int, Ladder],
    fixed: int,
    budgets: list[int],
    set_rung: Callable[[int, int], None],
    kind: str = "hidden",
    metric: str = "js",
    on_candidate: Callable[[int], None] | None = None,
    resume: PlanProgress | None = None,
    checkpoint: Callable[[PlanProgress], None] | None = None,
    shared_passes: bool = False,
) -> PlanProgress:
    """Plan every budget of ``budgets`` (bytes, each a ceiling) over ``ladders``; ``fixed``: the bytes outside
    the MoE blocks. ``set_rung(layer, i)`` puts rung ``i`` of the layer's ladder in place (0: the original).
    ``resume``: an interrupted run's progress (its steps are put back, the inputs behind them refreshed once,
    and only missing candidates are scored); ``checkpoint(progress)`` after every scored candidate (every
    shared pass) and step. On return the model holds the path's last state; the caller restores it."""
    reference = [runner.final(runner.outputs[b], "logits" if metric == "ppl" else kind)
                 for b in range(len(runner.batches))]
    result = resume or PlanProgress()
    state = {layer: 0 for layer in ladders}
    for step in result.steps:
        state[step["layer"]] = step["rung"]
    open_budgets = [b for b in sorted(budgets, reverse=True) if str(b) not in result.finals]
    changed = [layer for layer, i in state.items() if i]
    for layer in changed:
        set_rung(layer, state[layer])
    if changed and open_budgets:  # the cached inputs behind the changed layers, as the first run refreshed them
        runner.run_all(min(changed), record_from=min(changed) + 1)
    for layer in changed:
        if not ladders[layer].next(state[layer]):
            runner.forget(layer)

    def size(layer: int, i: int) -> int:
        return ladders[layer].rungs[i].bytes

    total = fixed + sum(size(layer, i) for layer, i in state.items())
    for b in list(open_budgets):
        if total <= b and not result.steps:  # the original fits
            result.finals[str(b)] = []
            open_budgets.remove(b)
    while open_budgets:
        current = result.steps[-1]["divergence"] if result.steps else 0.0
        cands = [(layer, i) for layer in sorted(ladders) for i in ladders[layer].next(state[layer])]
        if not cands:
            raise CdmoeError(f"no plan reaches {open_budgets[-1]:,} bytes: every MoE sub-layer is already dropped")
        scores = result.pending
        todo = [c for c in cands if _key(*c) not in scores]
        if shared_passes and todo:
            def swap(j: int, on: bool, todo=todo) -> None:  # candidate j in (on) or its layer's current rung back
                set_rung(todo[j][0], todo[j][1] if on else state[todo[j][0]])

            for j, lasts in runner.run_streams([layer for layer, _ in todo], swap):
                scores[_key(*todo[j])] = score_outputs(runner, reference, lasts, kind, metric)
                result.layer_passes += passes_from(runner, todo[j][0])
                if on_candidate:
                    on_candidate(1)
            todo = []
            if checkpoint:
                checkpoint(result)
        for layer, i in todo:
            set_rung(layer, i)
            scores[_key(layer, i)], passes = final_divergence(runner, reference, layer, kind, metric)
            set_rung(layer, state[layer])
            result.layer_passes += passes
            if on_candidate:
                on_candidate(1)
            if checkpoint:
                checkpoint(result)

        def entry(c: tuple[int, int]) -> dict:
            layer, i = c
            saved = size(layer, state[layer]) - size(layer, i)
            return {"layer": layer, "rung": i, "action": ladders[layer].rungs[i].action.label,
                    "divergence": scores[_key(*c)], "bytes": total - saved, "saved_bytes": saved,
                    "score": (scores[_key(*c)] - current) / saved}

        entries = [entry(c) for c in cands]
        best = min(entries, key=lambda e: (e["score"], e["layer"], e["rung"]))
        for b in list(open_budgets):
            fits = [e for e in entries if e["bytes"] <= b]
            final = min(fits, key=lambda e: (e["divergence"], e["layer"], e["rung"])) if fits else None
            if final is not None and final["divergence"] <= best["divergence"]:
                result.finals[str(b)] = result.steps + [final]
                open_budgets.remove(b)
        result.candidates.append(entries)
        result.pending = {}
        if open_budgets:
            layer, i = best["layer"], best["rung"]
            state[layer], total = i, best["bytes"]
            set_rung(layer, i)
            result.steps.append(best)
            runner.run_all(layer, record_from=layer + 1)  # refresh the inputs behind the changed layer
            result.layer_passes += passes_from(runner, layer)
            if not ladders[layer].next(i):  # dropped: no run starts there again
                runner.forget(layer)
        if checkpoint:
            checkpoint(result)
    return result
