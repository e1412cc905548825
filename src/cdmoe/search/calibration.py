"""Calibration data: N random windows of S tokens, tokenised once, seeded.

Sources (the ``--calib`` spec):

- ``c4`` (default, as the paper): documents of ``allenai/c4`` (``en``, train split), streamed
  through ``datasets`` and shuffled with the seed; a document shorter than S tokens is
  skipped, a longer one gives one random window of S tokens.
- a local ``.txt`` / ``.txt.gz`` file (paragraphs separated by blank lines), ``.jsonl``
  (field ``text``) or ``.parquet`` (column ``text``): the documents are tokenised,
  joined with the EOS token into one stream, and N windows of S tokens start at seeded
  random offsets.
- any other Hugging Face dataset: ``name[:config[:split]]``, used like ``c4``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import CdmoeError
from ..models.input_checks import check_text_file, decode_text, gunzip

__all__ = ["CalibSpec", "load_calibration", "read_documents"]

LOCAL_SUFFIXES = (".txt", ".gz", ".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class CalibSpec:
    source: str = "c4"
    samples: int = 100
    seq_len: int = 512
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def read_documents(path: str | Path, option: str = "--calib") -> list[str]:
    """Documents of a local text, JSON-lines or parquet file (``option``: the flag that named it, for errors)."""
    path = Path(path)
    check_text_file(path, option)
    name = path.name
    if name.endswith((".txt", ".txt.gz")):
        raw = gunzip(path, option) if name.endswith(".gz") else path.read_bytes()
        docs = [d.strip() for d in decode_text(raw, path, option).split("\n\n")]
    elif name.endswith((".jsonl", ".json")):
        docs = []
        for i, line in enumerate(decode_text(path.read_bytes(), path, option).splitlines()):
            if line.strip():
                try:
                    docs.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise CdmoeError(f"{path}:{i + 1} is not a JSON object with a 'text' field") from None
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow's errors for a file that is not parquet
            raise CdmoeError(f"{option} {path} is not a readable parquet file ({type(err).__name__}); re-create it") from None
        if "text" not in table.column_names:
            raise CdmoeError(f"{path} has no 'text' column (columns: {table.column_names})")
        docs = [str(t) for t in table.column("text").to_pylist()]
    docs = [d for d in docs if d and d.strip()]
    if not docs:
        raise CdmoeError(f"{option} {path} is empty")
    return docs


def _from_stream(tokenizer, docs: list[str], spec: CalibSpec) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc + ([eos] if eos is not None else []))
    stream = torch.tensor(ids, dtype=torch.long)
    total = spec.samples * spec.seq_len
    if len(stream) < spec.seq_len + 1:
        raise CdmoeError(f"calibration text has {len(stream)} tokens, fewer than one window of --seq-len {spec.seq_len}")
    n = spec.samples
    if len(stream) < total:
        n = max(1, len(stream) // spec.seq_len)
        warnings.warn(
            f"calibration text has only {len(stream)} tokens, fewer than the {total} requested "
            f"({spec.samples} x {spec.seq_len}); using {n} windows ({n * spec.seq_len} tokens)",
            stacklevel=3,
        )
    gen = torch.Generator().manual_seed(spec.seed)
    starts = torch.randint(0, len(stream) - spec.seq_len + 1, (n,), generator=gen)
    return torch.stack([stream[s : s + spec.seq_len] for s in starts.tolist()])


def _from_hub(tokenizer, spec: CalibSpec) -> torch.Tensor:
    from datasets import load_dataset

    name, config, split = "allenai/c4", "en", "train"
    if spec.source != "c4":
        parts = spec.source.split(":")
        name, config, split = parts[0], (parts[1] if len(parts) > 1 else None), (parts[2] if len(parts) > 2 else "train")
    try:
        data = load_dataset(name, config, split=split, streaming=True).shuffle(seed=spec.seed, buffer_size=10_000)
        gen = torch.Generator().manual_seed(spec.seed)
        rows = []
        for example in data:
            ids = tokenizer(example["text"], add_special_tokens=False)["input_ids"]
            if len(ids) <= spec.seq_len:
                continue
            start = int(torch.randint(0, len(ids) - spec.seq_len, (1,), generator=gen))
            rows.append(torch.tensor(ids[start : start + spec.seq_len]))
            if len(rows) == spec.samples:
                break
    except Exception as err:  # network and hub errors come in many types
        raise CdmoeError(
            f"cannot read calibration dataset {name!r} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            "if the hub is unreachable, pass a local file: --calib path/to/text.txt (or .jsonl / .parquet)"
        ) from None
    if not rows:
        raise CdmoeError(f"dataset {name!r} has no document longer than --seq-len {spec.seq_len}")
    if len(rows) < spec.samples:
        warnings.warn(f"dataset {name!r} gave only {len(rows)} of {spec.samples} samples", stacklevel=3)
    return torch.stack(rows)


def load_calibration(tokenizer, spec: CalibSpec) -> torch.Tensor:
    """Token ids (N, S) of the calibration set described by ``spec``."""
    if spec.samples < 1 or spec.seq_len < 2:
        raise CdmoeError("--samples must be >= 1 and --seq-len >= 2")
    source = Path(spec.source)
    if source.suffix in LOCAL_SUFFIXES or source.exists() or "/" in spec.source and spec.source.startswith((".", "/")):
        return _from_stream(tokenizer, read_documents(source), spec)
    return _from_hub(tokenizer, spec)
