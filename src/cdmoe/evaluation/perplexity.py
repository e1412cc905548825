"""Perplexity on held-out text.

The text (a local .txt/.txt.gz/.jsonl/.parquet file, or an HF dataset spec as for
calibration) is tokenised document by document and joined with the EOS token into one
stream, truncated to ``max_tokens``. Windows of ``seq_len`` tokens start every ``stride``
tokens (default ``stride = seq_len``: non-overlapping windows); each token is scored once,
by the first window that predicts it with the most context available under that stride
(the Hugging Face strided-perplexity recipe). PPL = exp(mean next-token NLL).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import CdmoeError
from ..search.calibration import read_documents

__all__ = ["token_limit", "token_stream", "perplexity"]


def token_limit(value: int | None, option: str = "--eval-tokens") -> int | None:
    """The one reading of every max-tokens option (``--eval-tokens``, ``--ppl-tokens``): None or 0 is the
    whole text (returned as None); a negative count or 1 (no token to predict) is a one-line error."""
    if value is None or value == 0:
        return None
    if value < 2:
        raise CdmoeError(f"{option} must be at least 2 (or 0 for the whole text), got {value}")
    return value


def token_stream(tokenizer, source: str | Path, max_tokens: int | None = None, option: str = "--eval-text") -> torch.Tensor:
    """One long (N,) stream of token ids from a text source (``option``: the flag that named it, for errors),
    at most ``max_tokens`` long (None or 0: the whole text)."""
    max_tokens = token_limit(max_tokens, option.replace("-text", "-tokens"))
    path = Path(source)
    if path.exists() or path.suffix:
        docs = read_documents(path, option)
    else:
        from datasets import load_dataset

        name, *rest = str(source).split(":")
        try:
            data = load_dataset(name, rest[0] if rest else None, split=rest[1] if len(rest) > 1 else "test")
        except Exception as err:
            raise CdmoeError(f"cannot load evaluation text {source!r} ({type(err).__name__}); pass a local file") from None
        docs = [t for t in data["text"] if t.strip()]
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else []))
        if max_tokens and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, seq_len: int = 512, stride: int | None = None, batch_size: int = 8) -> float:
    """exp(mean NLL) of ``stream`` under ``model`` with windows of ``seq_len`` every ``stride`` tokens."""
    stride = stride or seq_len
    if stride > seq_len:
        raise CdmoeError(f"--stride {stride} must not exceed --seq-len {seq_len}")
    if len(stream) < 2:
        raise CdmoeError("evaluation text has fewer than 2 tokens")
    device = next(model.parameters()).device
    windows = []  # (start, end, first scored position within the window)
    prev_end = 0
    for start in range(0, len(stream) - 1, stride):
        end = min(start + seq_len, len(stream))
        windows.append((start, end, max(prev_end - start, 0)))
        prev_end = end
        if end == len(stream):
            break
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        group = windows[i : i + batch_size]
        width = max(e - s for s, e, _ in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        labels = torch.full((len(group), width), -100, dtype=torch.long)
        for row, (s, e, first) in enumerate(group):
            ids[row, : e - s] = stream[s:e]
            labels[row, max(first, 1) : e - s] = stream[s + max(first, 1) : e]
        logits = model(input_ids=ids.to(device)).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(device),
                               ignore_index=-100, reduction="sum")
        nll += float(loss)
        count += int((labels[:, 1:] != -100).sum())
    return math.exp(nll / count)
