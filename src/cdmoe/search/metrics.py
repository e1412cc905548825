"""Divergences between original and condensed outputs, per token, as the search uses them.

Each token's output vector (hidden states or logits, shape (..., D)) is turned into a
distribution with a softmax over its last dimension; the divergence is computed per token
and summed, so a caller can accumulate over token chunks and divide by the token count.
JS is the paper's choice (Sec. 3.2; Table 5); KL(P || Q) is the alternative. All maths is
done in fp32.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["Metric", "divergence_sum", "sample_perplexity"]

Metric = Literal["js", "kl", "ppl"]


def divergence_sum(reference: torch.Tensor, candidate: torch.Tensor, metric: str = "js") -> torch.Tensor:
    """Sum over tokens of JS(P, Q) or KL(P || Q) with P = softmax(reference), Q = softmax(candidate).

    ``reference`` and ``candidate`` are (..., D); ``candidate`` may carry extra leading
    dimensions (e.g. one per candidate expert), in which case the result keeps them:
    (C, ...) tokens summed -> (C,).
    """
    log_p = F.log_softmax(reference.float(), dim=-1)
    log_q = F.log_softmax(candidate.float(), dim=-1)
    extra = candidate.dim() - reference.dim()
    if metric == "kl":
        per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    else:
        log_m = torch.logaddexp(log_p, log_q) - torch.log(torch.tensor(2.0))
        per_token = 0.5 * ((log_p.exp() * (log_p - log_m)).sum(-1) + (log_q.exp() * (log_q - log_m)).sum(-1))
    return per_token.reshape(*per_token.shape[:extra], -1).sum(-1) if extra else per_token.sum()


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
