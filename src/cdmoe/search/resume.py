"""Resumable search state: what an interrupted ``cdmoe condense`` already finished.

One JSON file, ``state.json``, in a directory that a rerun of the same command finds again
(``cdmoe condense`` uses ``.OUT.partial/state/`` beside the output), replaced atomically
after every finished step::

    {"key": {...}, "key_hash": "<sha256 of key>",
     "expert_layers": {"3": {"experts": [..], "gates": [..], "all_gates": [..], "counts": [..],
                             "step_scores": [..], "shared_only_score": x, "expert_passes": n}, ...},
     "layer_search": {"order": [..], "step_scores": [..], "single_layer_scores": {..},
                      "pending": {layer: score of the current step}, "layer_passes": n}}

``key`` names the run: the model (path and a hash of its config and weight index), the
calibration (spec and a sha256 of the token ids: the "calibration activations key"), the
search options and the compute dtype/device. A state whose key differs is refused.
Python floats round-trip exactly through JSON, and fp32 gates exactly through float64, so a
resumed run continues from bit-identical numbers and chooses what an uninterrupted one does.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import CdmoeError
from .expert_search import ExpertSearchResult
from .layer_search import LayerSearchResult

__all__ = ["SearchState", "key_hash", "model_key", "read_keyed_state", "run_key", "tokens_key", "STATE_NAME"]

STATE_NAME = "state.json"


def tokens_key(calib_ids: torch.Tensor) -> str:
    """sha256 of the calibration token ids (shape and values)."""
    digest = hashlib.sha256(str(tuple(calib_ids.shape)).encode())
    digest.update(calib_ids.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def model_key(model: str | Path) -> dict:
    """The model's identity: its path and a hash of its config and weight files' names and sizes."""
    path = Path(str(model))
    digest = hashlib.sha256()
    if path.is_dir():
        for name in sorted(os.listdir(path)):
            file = path / name
            if name.endswith((".json", ".safetensors", ".bin")) and file.is_file():
                digest.update(name.encode())
                digest.update(file.read_bytes() if name.endswith(".json") else str(file.stat().st_size).encode())
    return {"path": str(path.resolve()) if path.exists() else str(model), "files_sha256": digest.hexdigest()}


def run_key(model: str | Path, calib: dict, calib_ids: torch.Tensor, options, compute: dict) -> dict:
    """Everything that determines a search's result (see the module docstring)."""
    return {"model": model_key(model), "calibration": {**calib, "tokens_sha256": tokens_key(calib_ids)},
            "search": asdict(options), "compute": compute}


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def read_keyed_state(path: Path, key: dict, *, what: str, run: str, fresh: str, valid) -> dict:
    """The state stored at ``path`` for the run ``key``. A one-line error when the file is not a cdmoe ``what``
    (damaged or foreign: not JSON, no ``key_hash``, or ``valid(stored)`` false; ``--force`` would ``fresh``), or
    holds an interrupted ``run`` with a different key (naming the parts of the key that differ)."""
    corrupt = CdmoeError(f"{path} is corrupt (not a cdmoe {what}); pass --force to {fresh}")
    try:
        stored = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise corrupt from None
    if not (isinstance(stored, dict) and isinstance(stored.get("key_hash"), str) and valid(stored)):
        raise corrupt
    if stored["key_hash"] != key_hash(key):
        differ = [part for part in key if stored.get("key", {}).get(part) != key[part]] or ["format"]
        raise CdmoeError(f"{path.parent} holds an interrupted {run} with a different {' and '.join(differ)}; "
                         "rerun that exact command to resume it, or pass --force to start over")
    return stored


def _valid_search_state(stored: dict) -> bool:
    return (isinstance(stored.get("expert_layers"), dict)
            and (stored.get("layer_search") is None or isinstance(stored["layer_search"], dict))
            and all(isinstance(v, dict) for v in stored["expert_layers"].values()))


class SearchState:
    """The resumable progress of one search, kept in ``directory/state.json``."""

    def __init__(self, directory: str | Path, key: dict):
        self.path = Path(directory) / STATE_NAME
        self.key = key
        self.data = {"key": key, "key_hash": key_hash(key), "expert_layers": {}, "layer_search": None}
        self.resumed: dict | None = None
        if self.path.exists():
            stored = read_keyed_state(self.path, key, what="search state", run="run", fresh="start the search over",
                                      valid=_valid_search_state)
            self.data = stored
            layers = stored["layer_search"] or {}
            self.resumed = {"expert_layers": len(stored["expert_layers"]), "layer_steps": len(layers.get("order", [])),
                            "pending_candidates": len(layers.get("pending", {}))}

    # Algorithm 1 ------------------------------------------------------------------------
    def expert_layer(self, layer: int) -> tuple[ExpertSearchResult, torch.Tensor, torch.Tensor] | None:
        """(result, counts (E,), gates (E,)) of a finished layer, or None."""
        entry = self.data["expert_layers"].get(str(layer))
        if entry is None:
            return None
        found = ExpertSearchResult(layer=layer, experts=tuple(entry["experts"]), gates=tuple(entry["gates"]),
                                   step_scores=list(entry["step_scores"]), shared_only_score=entry["shared_only_score"],
                                   expert_passes=entry["expert_passes"])
        return (found, torch.tensor(entry["counts"], dtype=torch.long),
                torch.tensor(entry["all_gates"], dtype=torch.float32))

    def save_expert_layer(self, layer: int, found: ExpertSearchResult, counts: torch.Tensor, gates: torch.Tensor) -> None:
        self.data["expert_layers"][str(layer)] = {
            "experts": list(found.experts), "gates": list(found.gates), "step_scores": list(found.step_scores),
            "shared_only_score": found.shared_only_score, "expert_passes": found.expert_passes,
            "counts": counts.tolist(), "all_gates": gates.float().tolist(),
        }
        self._write()

    # Algorithm 2 ------------------------------------------------------------------------
    def layer_progress(self) -> LayerSearchResult | None:
        entry = self.data["layer_search"]
        if entry is None:
            return None
        return LayerSearchResult(
            order=list(entry["order"]), step_scores=list(entry["step_scores"]),
            single_layer_scores={int(k): v for k, v in entry["single_layer_scores"].items()},
            layer_passes=entry["layer_passes"], pending={int(k): v for k, v in entry["pending"].items()},
        )

    def save_layer_progress(self, result: LayerSearchResult) -> None:
        self.data["layer_search"] = {
            "order": list(result.order), "step_scores": list(result.step_scores),
            "single_layer_scores": {str(k): v for k, v in result.single_layer_scores.items()},
            "pending": {str(k): v for k, v in result.pending.items()}, "layer_passes": result.layer_passes,
        }
        self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)  # a kill leaves the old or the new state, never half of one
