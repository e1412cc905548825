"""Checks of a command's inputs before any work: one-line errors that name the problem and the fix.

- :func:`check_model_dir`: a local model directory has a ``config.json`` holding a JSON object,
  and (when weights are needed) safetensors files whose headers parse and whose sizes match
  them (an empty, truncated or corrupt file is named); a directory with only pickle weights
  (``pytorch_model.bin``) is refused, since loading them runs ``torch.load``.
- :func:`check_quantization`: a quantised checkpoint other than block FP8 is refused.
- :func:`check_text_file`: a local text input (``--calib``, ``--eval-text``, ``--ppl-text``,
  ``--task-text``, ``--data``) exists, has a supported suffix, is what its suffix says (a
  ``.gz`` file is gzip) and its first bytes are UTF-8 text, not binary.

Hub ids pass through: the hub's own loaders report their errors (see :mod:`cdmoe.models.loading`).
"""

from __future__ import annotations

import codecs
import gzip
import json
import struct
import zlib
from pathlib import Path

from ..errors import CdmoeError

__all__ = ["TEXT_SUFFIXES", "check_inputs", "check_model_dir", "check_quantization", "check_text_file", "looks_local",
           "read_config", "read_json_object", "safetensors_header", "shard_files"]

TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".json", ".parquet")
_SAMPLE = 1 << 16  # bytes of a text file checked up front


def looks_local(name_or_path: str | Path) -> bool:
    """Whether ``name_or_path`` names a local path rather than a hub id."""
    text = str(name_or_path)
    return text.startswith((".", "/", "~")) or Path(text).expanduser().exists() or text.count("/") > 1


def read_json_object(path: Path, fix: str) -> dict:
    """The JSON object in ``path``, or a one-line error saying what is wrong and ``fix``."""
    if Path(path).is_dir():
        raise CdmoeError(f"{path} is a directory, not a JSON file; {fix}")
    try:
        data = json.loads(Path(path).read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CdmoeError(f"{path} is not valid JSON ({err}); {fix}") from None
    except OSError as err:
        raise CdmoeError(f"cannot read {path} ({err.strerror}); {fix}") from None
    if not isinstance(data, dict):
        raise CdmoeError(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def read_config(directory: Path) -> dict:
    """``directory/config.json`` as a dict, or a one-line error."""
    path = directory / "config.json"
    if not path.exists():
        raise CdmoeError(f"{directory} has no config.json; pass a Hugging Face model directory")
    return read_json_object(path, "restore the model's config.json")


def check_family_keys(data: dict, where) -> None:
    """Fail if a config of a known MoE family lacks a key that sizes the model (transformers would
    silently take its default, e.g. 64 routed experts, and the checkpoint would not match)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .families import spec_for_model_type

    model_type = str(data.get("model_type", ""))
    spec = spec_for_model_type(model_type)
    if spec is None:
        return
    aliases = dict(getattr(CONFIG_MAPPING[model_type], "attribute_map", {}) or {}) if model_type in CONFIG_MAPPING else {}

    def present(key: str) -> bool:  # under its own name or a name transformers maps to it (num_experts <-> num_local_experts)
        return (key in data or aliases.get(key) in data
                or any(alias in data for alias, real in aliases.items() if real == key))

    missing = [k for k in ("hidden_size", "num_hidden_layers", "vocab_size", spec.top_k_key) if not present(k)]
    if not any(present(k) for k in spec.num_experts_keys):
        missing.append(" or ".join(spec.num_experts_keys))
    if missing:
        raise CdmoeError(f"{where} lacks {missing[0]!r}, which a {data['model_type']} config needs"
                         f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; restore the model's config.json")


def safetensors_header(path: Path) -> dict:
    """The header of a safetensors file (tensor name -> dtype, shape, data_offsets), read without the
    tensors, checked against the file's size: an empty, truncated or corrupt file is a one-line error."""
    hint = "re-download or re-convert the checkpoint"
    if not path.is_file():
        raise CdmoeError(f"{path} is not a file; {hint}")
    size = path.stat().st_size
    if size < 8:
        raise CdmoeError(f"{path} is {'empty' if size == 0 else 'truncated'} ({size} bytes); {hint}")
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > size - 8:
            raise CdmoeError(f"{path} is truncated or not a safetensors file (header of {length} bytes in a "
                             f"{size}-byte file); {hint}")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CdmoeError(f"{path} has a corrupt safetensors header; {hint}") from None
    if not isinstance(header, dict):
        raise CdmoeError(f"{path} has a corrupt safetensors header; {hint}")
    ends = [info["data_offsets"][1] for key, info in header.items()
            if key != "__metadata__" and isinstance(info, dict) and "data_offsets" in info]
    if len(ends) != len([k for k in header if k != "__metadata__"]):
        raise CdmoeError(f"{path} has a corrupt safetensors header; {hint}")
    if ends and 8 + length + max(ends) > size:
        raise CdmoeError(f"{path} is truncated: its header describes {8 + length + max(ends):,} bytes, the file has "
                         f"{size:,}; {hint}")
    return header


def shard_files(directory: Path) -> list[str]:
    """The safetensors files of a checkpoint directory: those its index names, else ``*.safetensors``."""
    index = directory / "model.safetensors.index.json"
    if not index.exists():
        return sorted(p.name for p in directory.glob("*.safetensors"))
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CdmoeError(f"{index} is not a valid safetensors index; re-download the checkpoint") from None


def check_model_dir(name_or_path: str | Path, weights: bool = True) -> dict | None:
    """Check a local model directory (hub ids pass); ``weights``: also its safetensors files.
    Returns its config.json (None for a hub id)."""
    if not looks_local(name_or_path):
        return None
    path = Path(str(name_or_path)).expanduser()
    if not path.exists():
        raise CdmoeError(f"model path {name_or_path} does not exist; pass a local model directory or a hub model id")
    if not path.is_dir():
        raise CdmoeError(f"model path {name_or_path} is a file; pass the model directory that holds config.json")
    config = read_config(path)
    check_family_keys(config, path / "config.json")
    if not weights:
        return config
    files = shard_files(path)
    missing = [f for f in files if not (path / f).exists()]
    if missing:
        raise CdmoeError(f"{path} lacks {missing[0]} (and {len(missing) - 1} more shards) that its index names; "
                         "is the download complete?")
    if not files:
        if list(path.glob("*.bin")) or list(path.glob("*.pt")) or list(path.glob("*.pth")):
            raise CdmoeError(f"{path} has only pickle weights (.bin), which cdmoe never loads (torch.load can run "
                             "code); convert them to safetensors first, e.g. model.save_pretrained(dir) in transformers")
        raise CdmoeError(f"{path} has no weights (no *.safetensors); is the download complete?")
    for name in files:
        safetensors_header(path / name)
    return config


def check_text_file(source: str | Path | None, option: str) -> None:
    """Check a local text input up front (a dataset name passes); ``option`` names it in errors."""
    if source is None:
        return
    path = Path(str(source)).expanduser()
    local = path.exists() or str(source).endswith(TEXT_SUFFIXES) or str(source).startswith((".", "/", "~"))
    if not local:
        return
    if not path.exists():
        raise CdmoeError(f"{option} {source} does not exist; pass an existing .txt/.txt.gz/.jsonl/.parquet file")
    if path.is_dir():
        raise CdmoeError(f"{option} {source} is a directory; pass a .txt/.txt.gz/.jsonl/.parquet file")
    name = path.name
    if not name.endswith(TEXT_SUFFIXES):
        raise CdmoeError(f"{option} {source} has an unsupported suffix; use .txt, .txt.gz, .jsonl or .parquet")
    if name.endswith(".parquet"):
        return
    with open(path, "rb") as f:
        head = f.read(_SAMPLE)
    if name.endswith(".gz"):
        if head[:2] != b"\x1f\x8b":
            raise CdmoeError(f"{option} {source} is named .gz but is not gzip-compressed; rename it or compress it")
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, _SAMPLE)
        except zlib.error:
            raise CdmoeError(f"{option} {source} is a corrupt gzip file; re-create it") from None
    text_error = text_problem(head)
    if text_error:
        raise CdmoeError(f"{option} {source} {text_error}; pass a UTF-8 text file")


def text_problem(head: bytes) -> str | None:
    """Why ``head`` (the start of a file) is not UTF-8 text, or None."""
    if b"\x00" in head:
        return "is binary, not text"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a character cut at the end is fine
    except UnicodeDecodeError as err:
        return f"is not UTF-8 text (byte {err.start})"
    return None


def decode_text(raw: bytes, path, option: str) -> str:
    """``raw`` as UTF-8 text, or a one-line error naming ``option``."""
    problem = text_problem(raw)
    if problem:
        raise CdmoeError(f"{option} {path} {problem}; pass a UTF-8 text file")
    return raw.decode("utf-8")


def gunzip(path: Path, option: str) -> bytes:
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error):
        raise CdmoeError(f"{option} {path} is not a valid gzip file; rename it or re-create it") from None


def check_quantization(config: dict, where) -> None:
    """Refuse a quantised checkpoint other than block FP8 (read as its bf16 cast, :mod:`cdmoe.models.fp8_blocks`):
    GPTQ, AWQ, bitsandbytes, compressed-tensors, ... would be condensed from values cdmoe does not read right."""
    entry = config.get("quantization_config")
    if not isinstance(entry, dict) or not entry or entry.get("quant_method") == "fp8":
        return
    method = entry.get("quant_method") or next((k for k in ("load_in_4bit", "load_in_8bit") if entry.get(k)), "unknown")
    raise CdmoeError(f"{where} is quantised ({method}); cdmoe reads unquantised and block-FP8 checkpoints only: "
                     "dequantise it first (load it with its library and save_pretrained in bf16) or use the "
                     "unquantised release")


def check_inputs(model: str | Path, calib=None, texts: dict[str, str | Path | None] | None = None,
                 weights: bool = True, seq_lens: dict[str, int | None] | None = None, quantized: bool = False) -> None:
    """Every check a command can make before loading anything: the model directory (a quantised one
    only with ``quantized``, e.g. to evaluate it; else :func:`check_quantization`), the calibration
    spec (``calib``: a :class:`~cdmoe.search.calibration.CalibSpec`), text files (``texts``: {option:
    path}) and window lengths (``seq_lens``: {option: tokens}, within the model's positions)."""
    config = check_model_dir(model, weights)
    if config is not None and not quantized:
        check_quantization(config, model)
    if config is not None and weights:
        from .fp8_blocks import block_fp8

        block_fp8(Path(str(model)).expanduser(), config)  # an FP8 layout cdmoe cannot read is refused now
    seq_lens = dict(seq_lens or {})
    if calib is not None:
        if calib.samples < 1:
            raise CdmoeError(f"--samples must be at least 1, got {calib.samples}")
        seq_lens["--seq-len"] = calib.seq_len
        check_text_file(calib.source, "--calib")
    if config is not None:
        config = config.get("text_config", config) if isinstance(config.get("text_config"), dict) else config
    positions = (config or {}).get("max_position_embeddings")
    for option, tokens in seq_lens.items():
        if tokens is not None and tokens < 2:
            raise CdmoeError(f"{option} must be at least 2, got {tokens}")
        if isinstance(positions, int) and tokens is not None and tokens > positions:
            raise CdmoeError(f"{option} {tokens} exceeds the model's {positions} positions "
                             f"(max_position_embeddings); pass {option} {positions} or less")
    for option, path in (texts or {}).items():
        check_text_file(path, option)
