"""Write a checkpoint directory again with some tensors' values replaced: same files, names, shapes, dtypes.

Used where a method changes only weights (healing): every file of the source directory is
copied as it is, except the safetensors shards that hold a replaced tensor, which are
rewritten with those tensors' new values cast to the dtype the shard stores them in (their
other tensors keep their bytes, the shard its metadata). The index and the total size stay
valid, since no name, shape or dtype changes. One shard is in memory at a time. The source
and the destination may be the same directory (each shard is replaced atomically).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import CdmoeError

__all__ = ["copy_with_replaced_tensors"]


def copy_with_replaced_tensors(source: Path, dest: Path, names: set[str],
                               values: Callable[[list[str]], dict[str, torch.Tensor]]) -> None:
    """Copy ``source`` into ``dest`` (created if needed) with the tensors ``names`` replaced.

    ``values(names_in_one_shard)`` gives the new values of those names (any dtype: each is cast to the
    stored one). Fails before writing anything if a name is in no shard, and before writing a shard if a
    value has another shape than the one stored.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    source, dest = Path(source), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    same = source.resolve() == dest.resolve()
    shards = {}
    for path in sorted(source.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            shards[path.name] = sorted(names & set(f.keys()))
    missing = sorted(names - {k for here in shards.values() for k in here})
    if missing:
        raise CdmoeError(f"{source} has no tensor {missing[0]} (and {len(missing) - 1} more) to replace")
    for path in sorted(source.iterdir()):
        if path.name.startswith("."):  # the partial directory's lock and state, never output files
            continue
        target = dest / path.name
        if path.suffix != ".safetensors":
            if not same:
                shutil.copytree(path, target) if path.is_dir() else shutil.copy2(path, target)
            continue
        here = shards[path.name]
        if not here:
            if not same:
                shutil.copy2(path, target)
            continue
        new = values(here)
        with safe_open(path, "pt") as f:
            tensors, metadata = {}, f.metadata()
            for key in f.keys():
                tensor = f.get_tensor(key)
                if key in new:
                    if tuple(new[key].shape) != tuple(tensor.shape):
                        raise CdmoeError(f"{key}: the new value has shape {tuple(new[key].shape)}, {path.name} stores "
                                         f"{tuple(tensor.shape)}")
                    tensor = new[key].to(device="cpu", dtype=tensor.dtype).contiguous()
                tensors[key] = tensor
        tmp = dest / f".{path.name}.tmp"
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, target)
        del tensors, new
