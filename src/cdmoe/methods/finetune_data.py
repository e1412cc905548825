"""Training data for ``cdmoe finetune``: plain text or instruction/answer pairs, tokenised.

Formats (``--format``, default ``auto``: detected from the first record's fields):

- ``text``: plain text for language modelling. A local ``.txt`` / ``.txt.gz`` (paragraphs
  separated by blank lines), ``.jsonl`` / ``.parquet`` with a ``text`` field, or an HF dataset
  with a ``text`` column. Documents are joined with EOS into one stream and cut into packed
  blocks of ``seq_len`` tokens (the last partial block is dropped); every token is a target.
- ``commonsense``: the commonsense170k records ``{"instruction", "input", "output", "answer"}``
  (LLM-Adapters), rendered with its Alpaca prompt; the loss is on the ``output`` tokens only.
- ``mmlu``: ``{"question", "choices", "answer"}`` with ``answer`` an index or a letter, rendered
  as the question, lettered choices and ``Answer:``; the loss is on `` X`` (the letter) only.

Records come from a local ``.jsonl`` / ``.json`` (JSON lines or one JSON array) / ``.parquet``
file, or an HF dataset ``name[:config[:split]]`` (split defaults to ``train``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CdmoeError
from ..search.calibration import read_documents

__all__ = ["FORMATS", "TokenDataset", "collate", "detect_format", "load_records", "build_dataset", "render_pair"]

FORMATS = ("text", "commonsense", "mmlu")
_FIELDS = {"text": {"text"}, "commonsense": {"instruction", "output"}, "mmlu": {"question", "choices", "answer"}}

_ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes "
           "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
_ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


def _read_json_rows(path: Path) -> list[dict]:
    text = path.read_text("utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):  # commonsense_170k.json is one array
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise CdmoeError(f"{path} is not valid JSON ({err}); expected one JSON array of records") from None
    rows = []
    for i, line in enumerate(text.splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise CdmoeError(f"{path}:{i + 1} is not valid JSON; expected one JSON object per line") from None
    return rows


def load_records(spec: str) -> list[dict]:
    """Records (dicts) of a local file or an HF dataset spec ``name[:config[:split]]``."""
    path = Path(spec)
    local = path.name.endswith((".txt", ".txt.gz")) or path.suffix in (".jsonl", ".json", ".parquet")
    if local and not path.exists():
        raise CdmoeError(f"training data {path} does not exist; pass an existing .txt/.jsonl/.json/.parquet file")
    if path.name.endswith((".txt", ".txt.gz")):
        return [{"text": d} for d in read_documents(path, "--data")]
    if local:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        else:
            rows = _read_json_rows(path)
    elif path.exists():
        raise CdmoeError(f"unsupported training data file {path}; use .txt, .txt.gz, .jsonl, .json or .parquet")
    else:
        from datasets import load_dataset

        name, *rest = spec.split(":")
        try:
            rows = list(load_dataset(name, rest[0] if rest else None, split=rest[1] if len(rest) > 1 else "train"))
        except Exception as err:  # hub and dataset errors come in many types
            raise CdmoeError(f"cannot load training data {spec!r} ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:200]}); pass a local .txt/.jsonl file") from None
    # cais/mmlu's auxiliary_train nests each record under "train"
    rows = [r["train"] if set(r) == {"train"} and isinstance(r["train"], dict) else r
            for r in rows if isinstance(r, dict)]
    if not rows:
        raise CdmoeError(f"training data {spec} has no records")
    return rows


def _format_of(record: dict) -> str | None:
    return next((name for name in ("commonsense", "mmlu", "text") if _FIELDS[name] <= set(record)), None)


def check_one_format(records: list[dict], spec: str, fmt: str, detected: bool) -> None:
    """Every record must have the fields of ``fmt`` (``detected``: and be detected as ``fmt``, as record 1
    was): a file mixing formats is refused rather than trained on in part."""
    for i, record in enumerate(records):
        found = _format_of(record)
        if not _FIELDS[fmt] <= set(record) or detected and found != fmt:
            what = f"a {found} record" if found else f"a record with the fields {sorted(record)}"
            first = "record 1 is" if detected else "--format is"
            raise CdmoeError(f"{spec}: record {i + 1} is {what}, {first} {fmt}; cdmoe trains on one format per "
                             f"file: split the file by format (or fix that record) and pass one with --data")


def detect_format(record: dict) -> str:
    """The format whose fields ``record`` has."""
    found = _format_of(record)
    if found:
        return found
    raise CdmoeError(f"cannot tell the data format from the fields {sorted(record)}; supported formats: "
                     "text (field 'text'), commonsense (instruction/input/output/answer), "
                     "mmlu (question/choices/answer)")


def render_pair(record: dict, fmt: str) -> tuple[str, str]:
    """(prompt, answer) text of one instruction-format record; the loss is on the answer only."""
    if fmt == "commonsense":
        template = _ALPACA_INPUT if (record.get("input") or "").strip() else _ALPACA
        return template.format(instruction=record["instruction"], input=record.get("input") or ""), record["output"]
    choices, answer = list(record["choices"]), record["answer"]
    letters = "ABCDEFGHIJ"[: len(choices)]
    if isinstance(answer, str) and answer.strip().upper() in letters:
        answer = letters.index(answer.strip().upper())
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise CdmoeError(f"MMLU record answer {record['answer']!r} is neither an index nor a letter of its "
                         f"{len(choices)} choices")
    lines = [record["question"].strip(), *(f"{letter}. {c}" for letter, c in zip(letters, choices)), "Answer:"]
    return "\n".join(lines), f" {letters[answer]}"


class TokenDataset(torch.utils.data.Dataset):
    """Examples ``{"input_ids": (L,), "labels": (L,)}`` (long); labels are -100 where no loss is taken."""

    def __init__(self, examples: list[dict[str, torch.Tensor]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.examples[i]


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example: input_ids/labels/attention_mask (B, L)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = e["input_ids"], e["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@dataclass(frozen=True)
class BuiltData:
    dataset: TokenDataset
    format: str
    records: int
    tokens: int  # tokens in the dataset (inputs, including prompt tokens)
    target_tokens: int  # tokens that carry loss


def _packed(tokenizer, docs: list[str], seq_len: int) -> list[dict]:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc + ([eos] if eos is not None else []))
    stream = torch.tensor(ids, dtype=torch.long)
    blocks = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)
    return [{"input_ids": b, "labels": b.clone()} for b in blocks]


def _pairs(tokenizer, records: list[dict], fmt: str, seq_len: int) -> list[dict]:
    eos = tokenizer.eos_token_id
    examples = []
    for record in records:
        prompt, answer = render_pair(record, fmt)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        a = a[:seq_len]
        p = p[max(0, len(p) + len(a) - seq_len):]  # too long: drop the prompt's start, keep the answer
        ids = torch.tensor(p + a, dtype=torch.long)
        examples.append({"input_ids": ids, "labels": torch.tensor([-100] * len(p) + a, dtype=torch.long)})
    return examples


def build_dataset(tokenizer, spec: str, fmt: str = "auto", seq_len: int = 256) -> BuiltData:
    """Tokenised training examples of ``spec`` in format ``fmt`` (or detected)."""
    if fmt != "auto" and fmt not in FORMATS:
        raise CdmoeError(f"unknown data format {fmt!r}; supported: auto, {', '.join(FORMATS)}")
    if seq_len < 2:
        raise CdmoeError("--seq-len must be >= 2")
    records = load_records(spec)
    detected = fmt == "auto"
    fmt = detect_format(records[0]) if detected else fmt
    missing = _FIELDS[fmt] - set(records[0])
    if missing:
        raise CdmoeError(f"{spec} records lack {sorted(missing)} needed by format {fmt!r} "
                         f"(fields: {sorted(records[0])})")
    check_one_format(records, spec, fmt, detected)
    if fmt == "text":
        examples = _packed(tokenizer, [r["text"] for r in records if (r.get("text") or "").strip()], seq_len)
        if not examples:
            raise CdmoeError(f"training text {spec} has fewer tokens than one block of --seq-len {seq_len}")
    else:
        examples = _pairs(tokenizer, records, fmt, seq_len)
    tokens = sum(len(e["input_ids"]) for e in examples)
    targets = sum(int((e["labels"] != -100).sum()) for e in examples)
    return BuiltData(TokenDataset(examples), fmt, len(records), tokens, targets)
