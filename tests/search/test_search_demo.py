"""Algorithm 2 on the trained demo model, whose layer order is informative (on tiny random models
the greedy order is always deepest-first, so a search that never refreshes its cached inputs
passes there): the fast search equals the literal one for the JS, KL and PPL metrics."""

import pytest
from conftest import DEMO_CALIB, ROOT
from naive_reference import naive_layer_search

import cdmoe
from cdmoe.models.adapter import moe_blocks
from cdmoe.models.condensed import fuse_condensed_mlp
from cdmoe.search.calibration import CalibSpec, load_calibration
from cdmoe.search.run import SearchOptions, run_search

DEMO_MODEL = ROOT / "demo" / "model"


@pytest.fixture(scope="module")
def demo():
    model = cdmoe.load_model(DEMO_MODEL)  # fp32 on CPU
    ids = load_calibration(cdmoe.load_tokenizer(DEMO_MODEL), CalibSpec(str(DEMO_CALIB), 8, 64, 0))
    return model, ids


@pytest.mark.parametrize("metric,final", [("js", "hidden"), ("kl", "hidden"), ("ppl", "logits")])
def test_fast_layer_search_equals_the_literal_one_on_the_demo_model(demo, metric, final):
    model, ids = demo
    result = run_search(model, ids, SearchOptions(layers=4, metric=metric, final=final, batch_size=4))
    blocks = {b.layer_idx: b for b in moe_blocks(model)}
    condensed = {int(layer): fuse_condensed_mlp(blocks[int(layer)], tuple(f["experts"]), tuple(f["gates"]))
                 for layer, f in result.record["expert_search"].items()}
    order, scores = naive_layer_search(model, ids, condensed, 4, final=final, metric=metric)
    assert result.record["layer_order"] == order
    assert result.record["layer_step_scores"] == pytest.approx(scores, rel=2e-3)
    assert order != sorted(blocks)[::-1][: len(order)]  # informative: not simply the deepest layers first
