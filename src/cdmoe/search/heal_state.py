"""Resumable healing: the layers an interrupted heal already trained, their weights and numbers.

A directory (``.OUT.partial/state/heal/`` beside the output) holds::

    heal.json                      {"key": {...}, "key_hash": "...", "layers": {"3": {FitResult}, ...}}
    layer-3.safetensors            the healed MLP of layer 3 (state-dict names, the compute dtype,
                                   values already rounded to the dtypes they are stored in)

A layer's weights are written (to a temporary file, renamed) before ``heal.json`` names the
layer, so a kill leaves either the layer finished or not started. ``key`` names the run: the
original model, the condensed layers it starts from, the calibration token ids, the options
and the compute dtype/device; a rerun with a different key is refused, as the search's state
is (:mod:`cdmoe.search.resume`). The weights are stored exactly (safetensors keeps every bit),
so a resumed run feeds the next layers the same inputs and ends with the same bytes as an
uninterrupted one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import CdmoeError
from .heal_fit import FitResult
from .resume import key_hash, read_keyed_state

__all__ = ["HealState", "STATE_FILE"]

STATE_FILE = "heal.json"


class HealState:
    """The healed layers of one run, kept in ``directory``."""

    def __init__(self, directory: str | Path, key: dict):
        self.directory = Path(directory)
        self.path = self.directory / STATE_FILE
        self.data = {"key": key, "key_hash": key_hash(key), "layers": {}}
        self.resumed = 0
        if self.path.exists():
            stored = read_keyed_state(self.path, key, what="heal state", run="heal", fresh="start over",
                                      valid=lambda stored: isinstance(stored.get("layers"), dict)
                                      and all(isinstance(v, dict) for v in stored["layers"].values()))
            self.data = stored
            self.resumed = len(stored["layers"])

    def weights_file(self, layer: int) -> Path:
        return self.directory / f"layer-{layer}.safetensors"

    def layer(self, layer: int) -> tuple[FitResult, dict[str, torch.Tensor]] | None:
        """(what happened, the healed weights on the CPU) of a finished layer, or None."""
        entry = self.data["layers"].get(str(layer))
        if entry is None:
            return None
        from safetensors.torch import load_file

        try:
            weights = load_file(self.weights_file(layer))
        except Exception:  # a missing or damaged file: safetensors raises several types
            raise CdmoeError(f"{self.weights_file(layer)} is missing or damaged; pass --force to start over") from None
        return FitResult(**{**entry, "val_curve": [tuple(p) for p in entry["val_curve"]]}), weights

    def save_layer(self, layer: int, result: FitResult, weights: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.weights_file(layer)
        tmp = target.with_name(f".{target.name}.tmp")
        save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, tmp)
        os.replace(tmp, target)
        self.data["layers"][str(layer)] = result.to_dict()
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)  # a kill leaves the old or the new state, never half of one

    def healed(self) -> dict[int, FitResult]:
        return {int(k): FitResult(**v) for k, v in self.data["layers"].items()}
