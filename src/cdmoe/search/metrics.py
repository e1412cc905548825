"""Divergences between original and condensed outputs, per token, as the search uses them.

Each token's output vector (hidden states or logits, shape (..., D)) is turned into a
distribution with a softmax over its last dimension; the divergence is computed per token
and summed, so a caller can accumulate over token chunks and divide by the token count.
JS is the paper's choice (Sec. 3.2; Table 5); KL(P || Q) is the alternative. All maths is
done in fp32.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["Metric", "divergence_per_token", "divergence_sum", "sample_perplexity"]

LN2 = math.log(2.0)

Metric = Literal["js", "kl", "ppl"]


def divergence_sum(reference: torch.Tensor, candidate: torch.Tensor, metric: str = "js") -> torch.Tensor:
    """Sum over tokens of JS(P, Q) or KL(P || Q) with P = softmax(reference), Q = softmax(candidate).

    ``reference`` and ``candidate`` are (..., D); ``candidate`` may carry extra leading
    dimensions (e.g. one per candidate expert), in which case the result keeps them:
    (C, ...) tokens summed -> (C,).
    """
    per_token = divergence_per_token(F.log_softmax(reference.float(), dim=-1), candidate, metric)
    extra = candidate.dim() - reference.dim()
    return per_token.reshape(*per_token.shape[:extra], -1).sum(-1) if extra else per_token.sum()


def divergence_per_token(log_p: torch.Tensor, candidate: torch.Tensor, metric: str = "js",
                         p: torch.Tensor | None = None) -> torch.Tensor:
    """JS(P, Q) or KL(P || Q) of each token, fp32: ``log_p`` = log softmax of the reference (T, D)
    (and optionally ``p`` = its exp), Q = softmax(``candidate``) (..., T, D) -> (..., T).

    Works in place where it can: about three candidate-sized fp32 tensors are alive at once,
    with the same values (bit for bit) as the textbook expressions.
    """
    log_q = F.log_softmax(candidate.float(), dim=-1)
    p = log_p.exp() if p is None else p
    if metric == "kl":
        return torch.sub(log_p, log_q).mul_(p).sum(-1)
    log_m = torch.logaddexp(log_p, log_q).sub_(LN2)
    p_term = torch.sub(log_p, log_m).mul_(p).sum(-1)
    diff = log_m.neg_().add_(log_q)  # log_q - log_m, in log_m's memory
    q_term = log_q.exp_().mul_(diff).sum(-1)
    return p_term.add_(q_term).mul_(0.5)


def sample_perplexity(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Perplexity of each sample, (B,): exp of the mean next-token NLL over its S - 1 predicted tokens.

    The PPL metric of the layer search (Sec. 4.4, Table 5: "For each calibration sample, we
    compute the change in PPL and select layers that minimize the average difference in PPL between
    the original and condensed models")
    is mean_s |sample_perplexity(condensed)_s - sample_perplexity(original)_s|, which depends on
    the samples only, never on how they are batched.
    """
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")  # (B, S-1)
    return nll.mean(dim=1).exp()
