"""Where the search keeps calibration hidden states between decoder layers: memory or disk.

The layer runner (:mod:`cdmoe.search.runner`) caches, per calibration batch, the input of every
decoder layer that later runs start from, and Algorithm 2's shared pass keeps one stream
of hidden states per candidate layer. Each entry is one tensor of shape (B, S, H) (batch
size, calibration sequence length, hidden size) in the compute dtype, under a key
``(kind, layer, batch)`` with kind ``"input"`` (layer ``layer``'s input) or ``"stream"``
(the stream that started at candidate ``layer``).

- :class:`MemoryActivations` (default): a dict of the tensors as given (CPU tensors, or the
  device's in whole mode, as the runner records them).
- :class:`DiskActivations` (``--activations disk``): one safetensors file per entry,
  ``DIR/{kind}-{layer}-{batch}.safetensors`` holding one CPU tensor ``hidden_states`` in the
  same dtype, so a tensor reads back bit for bit. ``DIR`` is a fresh ``cdmoe-activations-*``
  directory made inside the parent given (``cdmoe condense``: ``.OUT.partial/`` or
  ``--activations-dir``), with cdmoe's work marker, and removed by :meth:`~DiskActivations.close`.

One file per (layer, batch), not per layer: whole mode records batch by batch (one forward
pass yields every layer's input of one batch) and re-runs go layer by layer, so a file per
layer would have to gather all calibration tokens of a layer in memory before writing, which
is what the disk backend exists to avoid; single entries are also replaced (inputs refreshed
behind a newly condensed layer) and deleted (a scored candidate's stream) on their own. A
write goes to a temporary file renamed over the entry, so a reader never sees half a tensor.
Size on disk: calibration tokens x H x dtype bytes per cached layer (plus a ~100-byte header
per file).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import CdmoeError
from ..io.write_rule import new_work_dir, remove_work_dir

__all__ = ["ACTIVATION_BACKENDS", "DIR_PREFIX", "DiskActivations", "MemoryActivations", "activation_cache",
           "check_activations"]

ACTIVATION_BACKENDS = ("memory", "disk")
DIR_PREFIX = "cdmoe-activations-"
TENSOR_NAME = "hidden_states"

Key = tuple[str, int, int]  # (kind, layer, batch)


class MemoryActivations:
    """Hidden states in a dict (today's behaviour: nothing is copied)."""

    on_disk = False

    def __init__(self):
        self._entries: dict[Key, torch.Tensor] = {}

    def put(self, key: Key, hidden: torch.Tensor) -> None:
        self._entries[key] = hidden

    def get(self, key: Key) -> torch.Tensor:
        return self._entries[key]

    def pop(self, key: Key) -> torch.Tensor:
        return self._entries.pop(key)

    def delete(self, key: Key) -> None:
        self._entries.pop(key, None)

    def close(self) -> None:
        self._entries.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DiskActivations:
    """Hidden states in safetensors files, one per entry, in a fresh directory inside ``parent``."""

    on_disk = True

    def __init__(self, parent: str | Path):
        parent = Path(parent)
        try:
            self.directory = new_work_dir(parent, DIR_PREFIX, "activation cache")
        except OSError as err:
            raise CdmoeError(f"cannot create an activation cache in {parent} ({err.strerror}); "
                             "pass --activations-dir with a writable directory") from None

    def _path(self, key: Key) -> Path:
        kind, layer, batch = key
        return self.directory / f"{kind}-{layer}-{batch}.safetensors"

    def put(self, key: Key, hidden: torch.Tensor) -> None:
        from safetensors.torch import save

        path = self._path(key)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_bytes(save({TENSOR_NAME: hidden.detach().to("cpu").contiguous()}))
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise CdmoeError(f"cannot write the activation cache in {self.directory} ({err.strerror}); free disk "
                             "space there, pass --activations-dir on a larger disk, or use --activations memory") from None

    def get(self, key: Key) -> torch.Tensor:
        from safetensors.torch import load

        try:
            data = self._path(key).read_bytes()  # read whole: the tensor owns its memory, no file stays mapped
        except FileNotFoundError:
            raise KeyError(key) from None
        return load(data)[TENSOR_NAME]

    def pop(self, key: Key) -> torch.Tensor:
        hidden = self.get(key)
        self.delete(key)
        return hidden

    def delete(self, key: Key) -> None:
        self._path(key).unlink(missing_ok=True)

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("*.safetensors")) if self.directory.exists() else []

    def close(self) -> None:
        """Delete every entry and the directory (which carries cdmoe's work marker: nothing else is deleted)."""
        remove_work_dir(self.directory)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_activations(kind: str, directory: str | Path | None = None) -> None:
    """One-line errors for a bad ``--activations`` / ``--activations-dir`` (before any heavy work)."""
    if kind not in ACTIVATION_BACKENDS:
        raise CdmoeError(f"unknown --activations {kind!r}; use {' or '.join(ACTIVATION_BACKENDS)}")
    if directory is not None and kind != "disk":
        raise CdmoeError("--activations-dir is where --activations disk writes; add --activations disk or drop it")


def activation_cache(kind: str, parent: str | Path | None = None) -> MemoryActivations | DiskActivations:
    """A cache of the ``kind`` given (``memory`` | ``disk``); ``disk`` writes into a new directory in ``parent``."""
    check_activations(kind)
    if kind == "memory":
        return MemoryActivations()
    if parent is None:
        raise CdmoeError("--activations disk needs a directory for its files; pass --activations-dir")
    return DiskActivations(parent)
