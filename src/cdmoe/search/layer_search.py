"""Greedy layer selection (Algorithm 2), re-running only from the candidate layer onward.

Step n adds the MoE layer whose condensation (with its Algorithm 1 experts) minimises
the divergence between the original and the condensed model's final output on the
calibration tokens, given the n-1 layers already condensed. The final output is either
the final normed hidden state (softmax over the hidden dimension, as the official code)
or the vocabulary distribution (``logits``); ``ppl`` scores the mean over calibration samples
of |PPL_condensed - PPL_orig| of each sample (the paper's PPL metric, Sec. 4.4 / Table 5).

Cost: layers before a candidate are unchanged by it, so each candidate re-runs only
layers ``l..L-1`` from the cached input of layer ``l`` (:class:`~cdmoe.search.runner.LayerRunner`);
after each step the caches of the layers behind the chosen one are refreshed once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .metrics import divergence_sum, sample_perplexity
from .runner import LayerRunner

__all__ = ["LayerSearchResult", "greedy_layers", "final_divergence", "reference_outputs"]


@dataclass
class LayerSearchResult:
    order: list[int] = field(default_factory=list)  # layers in the order chosen
    step_scores: list[float] = field(default_factory=list)  # divergence after each step
    single_layer_scores: dict[int, float] = field(default_factory=dict)  # step 1: each layer alone (Fig. 2)
    layer_passes: int = 0  # decoder-layer forward passes over one calibration batch
    pending: dict[int, float] = field(default_factory=dict)  # scores of the current step so far (for resuming)


def reference_outputs(runner: LayerRunner, kind: str, metric: str) -> list[torch.Tensor | None]:
    """What the original model's final output is compared with, per batch, on the compute device:
    the normed hidden states (B, S, H) for ``hidden``; for ``ppl`` only each sample's perplexity (B,);
    for ``logits`` nothing (None): the reference logits are recomputed chunk by chunk from the last
    layer's output (``runner.outputs``) when scored, so T x V logits never wait in memory
    (Qwen1.5-MoE on 100 x 512 tokens: 15.6 GB in bf16)."""
    if metric == "ppl":
        return [sample_perplexity(runner.final(out, "logits"), ids.to(runner.device))
                for out, ids in zip(runner.outputs, runner.batches)]
    if kind == "logits":
        return [None] * len(runner.batches)
    return [runner.final(out, kind) for out in runner.outputs]


def final_divergence(
    runner: LayerRunner, reference: list[torch.Tensor | None], start: int, kind: str, metric: str,
    vocab_chunk: int = 1024,
) -> tuple[float, int]:
    """Mean per-token divergence of the model's final output, re-running from layer ``start``.

    ``reference``: :func:`reference_outputs`; logits are compared in token chunks so that
    (chunk, V) fits memory. Returns (score, decoder-layer passes made).
    """
    lasts = runner.run_all(start)
    return score_outputs(runner, reference, lasts, kind, metric, vocab_chunk), passes_from(runner, start)


def passes_from(runner: LayerRunner, start: int) -> int:
    """Decoder-layer passes (over one batch) of a run from layer ``start`` to the end."""
    return (len(runner.layers) - start) * len(runner.batches)


def score_outputs(runner: LayerRunner, reference: list[torch.Tensor | None], lasts: list[torch.Tensor], kind: str,
                  metric: str, vocab_chunk: int = 1024) -> float:
    """Mean per-token divergence between the original model's final output (``reference``, see
    :func:`reference_outputs`) and the final output of ``lasts`` (last-layer outputs); for ``ppl`` the
    mean per-sample |perplexity change| (:func:`~cdmoe.search.metrics.sample_perplexity`). Summed on
    the compute device (float64); the host reads the one number at the end."""
    total = torch.zeros((), dtype=torch.float64, device=runner.device)
    tokens = 0
    for b, ids in enumerate(runner.batches):
        last = lasts[b].to(runner.device)
        if metric == "ppl":
            change = sample_perplexity(runner.final(last, "logits"), ids.to(last.device)) - reference[b]
            total += change.abs().sum().double()
            tokens += ids.shape[0]  # samples
            continue
        flat_last = last.reshape(-1, last.shape[-1])
        flat_orig = runner.outputs[b].reshape(-1, last.shape[-1])
        flat_ref = None if reference[b] is None else reference[b].reshape(-1, reference[b].shape[-1])
        for s in range(0, flat_last.shape[0], vocab_chunk):
            out = runner.final(flat_last[s : s + vocab_chunk], kind)
            ref = runner.final(flat_orig[s : s + vocab_chunk], kind) if flat_ref is None else flat_ref[s : s + vocab_chunk]
            total += divergence_sum(ref, out, metric).double()
        tokens += flat_last.shape[0]
    return float(total) / tokens


@torch.no_grad()
def greedy_layers(
    runner: LayerRunner,
    candidates: dict[int, object],
    n: int,
    set_block: Callable[[int, object | None], None],
    kind: str = "hidden",
    metric: str = "js",
    on_step: Callable[[int, int], None] | None = None,
    resume: LayerSearchResult | None = None,
    checkpoint: Callable[[LayerSearchResult], None] | None = None,
    shared_passes: bool = False,
) -> LayerSearchResult:
    """Algorithm 2: pick ``n`` of ``candidates`` ({layer: condensed module or choice}).

    ``set_block(layer, candidate)`` swaps a condensed layer in, ``set_block(layer, None)``
    restores the original block. On return the chosen layers are swapped in.

    ``resume``: the progress of an interrupted run (steps done, scores of the current
    step); its finished steps are replayed (blocks swapped in, caches refreshed exactly as
    the first run did) and only the missing candidates are scored. ``checkpoint(result)``
    is called after every scored candidate and every finished step.

    ``shared_passes`` (sequential mode): all candidates of a step run in one pass over the
    layers (:meth:`LayerRunner.run_candidates`), so each layer is loaded once per step instead
    of once per candidate behind it; the scores are the same numbers.
    """
    reference = reference_outputs(runner, kind, metric)
    result = resume or LayerSearchResult()
    remaining = [layer for layer in sorted(candidates) if layer not in result.order]
    for step, best in enumerate(result.order):  # replay finished steps (their passes are already counted)
        set_block(best, candidates[best])
        if step < n - 1:
            runner.refresh_behind(best)
    for step in range(len(result.order), n):
        scores = result.pending
        todo = [layer for layer in remaining if layer not in scores]
        if shared_passes and todo:
            streams = runner.run_candidates(todo, lambda layer, on: set_block(layer, candidates[layer] if on else None))
            for layer, lasts in streams:  # one candidate's outputs in memory at a time
                scores[layer] = score_outputs(runner, reference, lasts, kind, metric)
                result.layer_passes += passes_from(runner, layer)
        for layer in remaining:
            if layer not in scores:
                set_block(layer, candidates[layer])
                scores[layer], passes = final_divergence(runner, reference, layer, kind, metric)
                result.layer_passes += passes
                set_block(layer, None)
                if checkpoint:
                    checkpoint(result)
            if on_step:
                on_step(step, layer)
        if step == 0:
            result.single_layer_scores = dict(scores)
        best = min(remaining, key=lambda layer: (scores[layer], layer))
        set_block(best, candidates[best])
        remaining.remove(best)
        result.order.append(best)
        result.step_scores.append(scores[best])
        result.pending = {}
        if step < n - 1:  # refresh the inputs of the layers behind the newly condensed one
            runner.refresh_behind(best)
            result.layer_passes += (len(runner.layers) - best) * len(runner.batches)
        if checkpoint:
            checkpoint(result)
    return result
