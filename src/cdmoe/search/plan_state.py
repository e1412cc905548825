"""Resumable state of a budget planner run: :class:`~cdmoe.search.resume.SearchState`'s file, with two
more entries::

    "saliency": {"3": [S_0, ..., S_{E-1}], ...},      # REAP saliency of each finished MoE layer
    "planner": {"steps": [..], "candidates": [[..], ..], "pending": {"3:1": divergence, ..},
                "finals": {"<budget bytes>": [..]}, "layer_passes": n}

A layer's Algorithm 1 result and its saliency are written together (one atomic write), so a resumed
run finds both or neither. Floats round-trip exactly through JSON, so a resumed run chooses what an
uninterrupted one does.
"""

from __future__ import annotations

import torch

from .expert_search import ExpertSearchResult
from .planner import PlanProgress
from .resume import SearchState

__all__ = ["PlanState"]


class PlanState(SearchState):
    """The progress of one planner run, in ``directory/state.json`` (keyed like a search)."""

    def __init__(self, directory, key: dict):
        super().__init__(directory, key)
        self.data.setdefault("saliency", {})
        self.data.setdefault("planner", None)
        if self.resumed is not None:
            planner = self.data["planner"] or {}
            self.resumed = {"expert_layers": len(self.data["expert_layers"]), "plan_steps": len(planner.get("steps", [])),
                            "pending_candidates": len(planner.get("pending", {}))}

    def saliency(self, layer: int) -> torch.Tensor | None:
        """REAP saliency (E,) float64 of a finished layer, or None."""
        entry = self.data["saliency"].get(str(layer))
        return None if entry is None else torch.tensor(entry, dtype=torch.float64)

    def save_layer(self, layer: int, found: ExpertSearchResult, counts: torch.Tensor, gates: torch.Tensor,
                   saliency: torch.Tensor) -> None:
        """Algorithm 1's result and the saliency of one layer, in one write."""
        self.data["saliency"][str(layer)] = saliency.double().tolist()
        self.save_expert_layer(layer, found, counts, gates)

    def plan_progress(self) -> PlanProgress | None:
        entry = self.data["planner"]
        if entry is None:
            return None
        return PlanProgress(steps=list(entry["steps"]), candidates=list(entry["candidates"]),
                            pending=dict(entry["pending"]), finals=dict(entry["finals"]),
                            layer_passes=entry["layer_passes"])

    def save_plan_progress(self, progress: PlanProgress) -> None:
        self.data["planner"] = {"steps": progress.steps, "candidates": progress.candidates,
                                "pending": progress.pending, "finals": progress.finals,
                                "layer_passes": progress.layer_passes}
        self._write()
