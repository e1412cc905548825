"""Writing a condensed checkpoint: atomically, smaller on disk, loadable anywhere.

The output directory holds safetensors with only the tensors the condensed model has
(dropped experts and removed routers are gone), ``config.json`` (with ``auto_map`` to the
shipped ``modeling_cdmoe.py`` unless the family's own format expresses the result),
tokenizer files, ``generation_config.json``, a model card ``README.md`` and the record
``cdmoe.json`` (layers, experts, gates, search results, versions).

Nothing is written at ``out`` until everything succeeded: the files go to ``.OUT.partial``
beside it, locked by the run, which is renamed into place at the end
(:mod:`cdmoe.io.output_dir`). In a resumable run (``cdmoe condense``) its ``state/``
subdirectory holds the search progress; it is kept when the run fails or is killed, so that
rerunning the same command resumes (see :mod:`cdmoe.search.resume`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import PreTrainedModel

from ..io.output_dir import STATE_DIR, atomic_output_dir, check_output_dir, partial_dir, write_output_file
from .record import RECORD_NAME

__all__ = ["STATE_DIR", "atomic_output_dir", "check_output_dir", "partial_dir", "save", "save_condensed", "versions",
           "write_condensed", "write_record"]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def versions() -> dict[str, str]:
    import torch
    import transformers

    from .._version import __version__

    return {"cdmoe": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _copy_tokenizer(source: str | Path | None, tokenizer, dest: Path) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(dest)
        return
    if source is not None and Path(source).is_dir():
        for name in TOKENIZER_FILES:
            if (Path(source) / name).exists():
                shutil.copyfile(Path(source) / name, dest / name)


def write_condensed(
    directory: Path,
    record: dict,
    write_weights,
    *,
    tokenizer=None,
    source: str | Path | None = None,
    extra_files=None,
) -> None:
    """Fill ``directory``: weights and config (``write_weights(directory)``), tokenizer, record, model card."""
    from .model_card import model_card

    write_weights(directory)
    _copy_tokenizer(source, tokenizer, directory)
    record = {**record, "versions": versions()}
    (directory / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    (directory / "README.md").write_text(model_card(record))
    if extra_files is not None:  # e.g. plots, written inside the same atomic directory
        extra_files(directory)


def save_condensed(
    model,
    out: str | Path,
    record: dict,
    *,
    tokenizer=None,
    source: str | Path | None = None,
    force: bool = False,
    max_shard_size: str = "5GB",
    extra_files=None,
    storage=None,
    inputs=(),
) -> Path:
    """Save a condensed in-memory model with its tokenizer, record and model card.

    Each tensor is first cast, in place, to the dtype it is stored in: ``storage`` (a
    :class:`~cdmoe.models.storage_dtypes.StoragePlan`), by default the plan of ``source`` (every tensor
    the source has in the source's dtype, new ones in ``config.dtype``). A quantised model is
    written as it is (see :func:`cdmoe.methods.quantize.quantize_model`). ``extra_files(tmp_dir)`` may write more files into the directory before
    it is moved into place.
    """
    from ..models.storage_dtypes import cast_to_storage, plan_of
    from .fp8_output import save_weights

    plan = None
    if not getattr(model, "is_quantized", False):  # a quantised model is written as transformers loaded it
        plan = storage if storage is not None else plan_of(model, source)
        cast_to_storage(model, plan)
    with atomic_output_dir(out, force=force, inputs=(source, *inputs)) as tmp:
        write_condensed(tmp, record, lambda d: save_weights(model, d, plan, max_shard_size),
                        tokenizer=tokenizer, source=source, extra_files=extra_files)
    return Path(out)


def write_record(directory: str | Path, record: dict) -> None:
    """Rewrite the record of a finished output directory (e.g. to add measurements)."""
    path = Path(directory) / RECORD_NAME
    previous = json.loads(path.read_text()) if path.exists() else {}
    write_output_file(path, json.dumps({**record, "versions": previous.get("versions", versions())}, indent=2) + "\n")


def save(model: PreTrainedModel, out: str | Path, record: dict, *, tokenizer=None, source: str | Path | None = None,
         force: bool = False, extra_files=None, storage=None, inputs=()) -> Path:
    """Write the condensed model, tokenizer, record and model card to ``out`` (atomically).

    The model is first cast in place to the dtypes it is stored in: every tensor ``source`` (the
    checkpoint it was loaded from) has keeps that checkpoint's dtype, byte for byte; new tensors
    take ``model.config.dtype`` (:mod:`cdmoe.models.storage_dtypes`; ``storage`` overrides).
    """
    source = source if source is not None else getattr(model.config, "_name_or_path", None) or None
    return save_condensed(model, out, record, tokenizer=tokenizer, source=source, force=force, extra_files=extra_files,
                          storage=storage, inputs=(source, *inputs))
