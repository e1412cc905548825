"""``--metric ppl``: the mean over calibration samples of |PPL change| (Sec. 4.4, Table 5), batch-size free."""

import math

import pytest
import torch
from conftest import make_tiny

from cdmoe.methods.ablations import fused_modules, swapped_blocks
from cdmoe.models.condensed import LayerChoice
from cdmoe.search.run import SearchOptions, run_search


def per_sample_ppl(model, ids):
    """Each sample's perplexity from a plain full forward pass, written independently of cdmoe.search.metrics."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    out = []
    for row, tokens in zip(logits, ids):
        logp = torch.log_softmax(row[:-1], dim=-1)
        nll = -logp[torch.arange(len(tokens) - 1), tokens[1:]].mean()
        out.append(math.exp(float(nll)))
    return out


def test_ppl_scores_are_per_sample_and_do_not_depend_on_the_batch_size():
    model = make_tiny("deepseek_v2", seed=2, num_hidden_layers=5)
    ids = torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(3))
    runs = [run_search(model, ids, SearchOptions(layers=3, experts=2, metric="ppl", batch_size=b)).record
            for b in (1, 4, 6)]
    for run in runs[1:]:
        assert run["layer_order"] == runs[0]["layer_order"]
        assert run["layer_step_scores"] == pytest.approx(runs[0]["layer_step_scores"], rel=1e-4)
        assert run["single_layer_scores"] == pytest.approx(runs[0]["single_layer_scores"], rel=1e-4)
    # the first step's scores are mean_s |PPL_s(condensed) - PPL_s(original)| from full forward passes
    record = runs[0]
    original = per_sample_ppl(model, ids)
    for layer, score in record["single_layer_scores"].items():
        found = record["expert_search"][layer]
        choice = LayerChoice(layer=int(layer), experts=tuple(found["experts"]), gates=tuple(found["gates"]))
        with swapped_blocks(model, fused_modules(model, [choice])):
            condensed = per_sample_ppl(model, ids)
        expected = sum(abs(c - o) for c, o in zip(condensed, original)) / len(original)
        assert score == pytest.approx(expected, rel=1e-4), layer
