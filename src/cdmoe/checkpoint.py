"""Writing a condensed checkpoint: atomically, smaller on disk, loadable anywhere.

The output directory holds safetensors with only the tensors the condensed model has
(dropped experts and removed routers are gone), ``config.json`` (with ``auto_map`` to the
shipped ``modeling_cdmoe.py`` unless the family's own format expresses the result),
tokenizer files, ``generation_config.json``, a model card ``README.md`` and the record
``cdmoe.json`` (layers, experts, gates, search results, versions).

Nothing is written at ``out`` until everything succeeded: the files go to a temporary
directory beside it, which is renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import CdmoeError

__all__ = ["RECORD_NAME", "atomic_output_dir", "check_output_dir", "save_condensed", "read_record", "versions", "write_record"]

RECORD_NAME = "cdmoe.json"
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


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; move it to ``out`` only on success."""
    out = Path(out)
    check_output_dir(out, force)
    if out.exists() and not out.is_dir():
        raise CdmoeError(f"output path {out} is a file; choose a directory path for --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
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
    from .model_card import model_card

    with atomic_output_dir(out, force=force) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        _copy_tokenizer(source, tokenizer, tmp)
        record = {**record, "versions": versions()}
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(record))
        if extra_files is not None:  # e.g. plots, written inside the same atomic directory
            extra_files(tmp)
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
