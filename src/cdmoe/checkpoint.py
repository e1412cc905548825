"""Writing a condensed checkpoint: atomically, smaller on disk, loadable anywhere.

The output directory holds safetensors with only the tensors the condensed model has
(dropped experts and removed routers are gone), ``config.json`` (with ``auto_map`` to the
shipped ``modeling_cdmoe.py`` unless the family's own format expresses the result),
tokenizer files, ``generation_config.json``, a model card ``README.md`` and the record
``cdmoe.json`` (layers, experts, gates, search results, versions).

Nothing is written at ``out`` until everything succeeded: the files go to a temporary
directory beside it, which is renamed into place at the end. A resumable run (``cdmoe
condense``) uses a deterministic one, ``.OUT.partial`` (:func:`partial_dir`), whose
``state/`` subdirectory holds the search progress; it is kept when the run fails or is
killed, so that rerunning the same command resumes (see :mod:`cdmoe.resume`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import CdmoeError

__all__ = ["RECORD_NAME", "STATE_DIR", "atomic_output_dir", "check_output_dir", "partial_dir", "save_condensed",
           "write_condensed", "read_record", "versions", "write_record"]

RECORD_NAME = "cdmoe.json"
STATE_DIR = "state"  # resumable search progress inside the partial directory
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

    from . import __version__

    return {"cdmoe": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def check_output_dir(out: str | Path, force: bool = False) -> None:
    """Fail fast (before any heavy work) if ``out`` exists and may not be replaced."""
    if Path(out).exists() and not force:
        raise CdmoeError(f"output directory {out} already exists; choose another --out or pass --force to replace it")


def partial_dir(out: str | Path) -> Path:
    """The deterministic temporary directory of a resumable run writing ``out``."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool = False, resumable: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; move it to ``out`` only on success.

    ``resumable``: the directory is :func:`partial_dir` (found again by a rerun); with ``force``
    it starts empty; on failure it is kept if it holds a search state (``state/``), and that
    state is removed before the directory becomes ``out``.
    """
    out = Path(out)
    check_output_dir(out, force)
    if out.exists() and not out.is_dir():
        raise CdmoeError(f"output path {out} is a file; choose a directory path for --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    if resumable:
        tmp = partial_dir(out)
        if tmp.exists() and (force or not (tmp / STATE_DIR).exists()):
            shutil.rmtree(tmp)  # --force, or leftovers without progress worth keeping
        tmp.mkdir(exist_ok=True)
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if resumable:
            shutil.rmtree(tmp / STATE_DIR, ignore_errors=True)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        if not (resumable and (tmp / STATE_DIR).exists()):
            shutil.rmtree(tmp, ignore_errors=True)
        raise


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
) -> Path:
    """Save a condensed in-memory model with its tokenizer, record and model card.

    ``extra_files(tmp_dir)`` may write more files into the directory before it is moved into place.
    """
    with atomic_output_dir(out, force=force) as tmp:
        write_condensed(tmp, record, lambda d: model.save_pretrained(d, max_shard_size=max_shard_size),
                        tokenizer=tokenizer, source=source, extra_files=extra_files)
    return Path(out)


def write_record(directory: str | Path, record: dict) -> None:
    """Rewrite the record of a finished output directory (e.g. to add measurements)."""
    path = Path(directory) / RECORD_NAME
    previous = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**record, "versions": previous.get("versions", versions())}, indent=2) + "\n")


def read_record(directory: str | Path) -> dict:
    path = Path(directory) / RECORD_NAME
    if not path.exists():
        raise CdmoeError(f"{directory} has no {RECORD_NAME}; is it a cdmoe output directory?")
    return json.loads(path.read_text())
