"""The fast search chooses what the literal Algorithms 1 and 2 choose; gates are Eq. 2."""

import pytest
import torch
from conftest import make_tiny
from naive_reference import naive_experts, naive_layers, recorded_gates

from cdmoe.errors import CdmoeError
from cdmoe.models.adapter import moe_blocks
from cdmoe.models.condensed import fuse_condensed_mlp
from cdmoe.search.expert_search import SearchMemory
from cdmoe.search.run import SearchOptions, run_search


def _calib(seed=0, n=6, s=24):
    return torch.randint(0, 128, (n, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen2_moe", "mixtral", "granitemoe", "deepseek_v3"])
def test_fast_search_equals_naive(family):
    model = make_tiny(family, seed=3, num_hidden_layers=5)
    ids = _calib()
    result = run_search(model, ids, SearchOptions(layers=3, experts=2, batch_size=4))
    per_layer = result.record["expert_search"]
    condensed = {}
    for block in moe_blocks(model):
        gates = torch.tensor(per_layer[str(block.layer_idx)]["gates"])
        all_gates, _ = recorded_gates(model, ids, block.layer_idx)  # every expert's gate, from the library router
        expected = naive_experts(model, ids, block.layer_idx, 2, all_gates)
        assert per_layer[str(block.layer_idx)]["experts"] == expected, f"layer {block.layer_idx}"
        torch.testing.assert_close(gates, all_gates[expected], rtol=1e-5, atol=1e-6)
        condensed[block.layer_idx] = fuse_condensed_mlp(block, tuple(expected), tuple(gates.tolist()))
    assert [c.layer for c in result.choices] == naive_layers(model, ids, condensed, 3)


@pytest.mark.parametrize("final", ["hidden", "logits"])
def test_layer_order_matches_naive_for_both_final_distributions(final):
    model = make_tiny("qwen3_moe", seed=5, num_hidden_layers=5)
    ids = _calib(seed=2)
    result = run_search(model, ids, SearchOptions(layers=4, experts=1, final=final, batch_size=3))
    condensed = {c.layer: fuse_condensed_mlp(b, c.experts, c.gates)
                 for b in moe_blocks(model) for c in result.choices if c.layer == b.layer_idx}
    assert [c.layer for c in result.choices] == naive_layers(model, ids, condensed, 4, final=final)


def test_gates_equal_eq2_recomputed_from_recorded_routing():
    model = make_tiny("deepseek_v3", seed=1)
    ids = _calib(n=8, s=32)
    result = run_search(model, ids, SearchOptions(layers=1, experts=3, batch_size=8))
    for layer, found in result.record["expert_search"].items():
        gates, counts = recorded_gates(model, ids, int(layer))
        assert found["token_counts"] == counts.tolist()
        for e, g in zip(found["experts"], found["gates"]):
            assert counts[e] > 0 and g == pytest.approx(float(gates[e]), rel=1e-5)


def test_search_is_deterministic_and_leaves_model_unchanged():
    model = make_tiny("deepseek_v2", seed=2)
    ids = _calib()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    a = run_search(model, ids, SearchOptions(layers=2, experts=2))
    b = run_search(model, ids, SearchOptions(layers=2, experts=2))
    assert a.choices == b.choices
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_fast_search_makes_fewer_expert_passes_than_algorithm_1_as_written():
    model = make_tiny("deepseek_v2", seed=2)
    result = run_search(model, _calib(), SearchOptions(layers=1, experts=3))
    n_layers, e, k = 3, 8, 3
    literal = n_layers * sum(e - i for i in range(k))  # layer evaluations of Alg. 1 as written
    assert result.record["cost"]["expert_forward_passes"] == n_layers * e < literal


def test_uncached_expert_outputs_give_the_same_choice():
    model = make_tiny("mixtral", seed=4)
    ids = _calib()
    cached = run_search(model, ids, SearchOptions(layers=2, experts=2))
    streamed = run_search(model, ids, SearchOptions(layers=2, experts=2), memory=SearchMemory(cache_bytes=0))
    assert cached.choices == streamed.choices
    assert streamed.record["cost"]["expert_forward_passes"] > cached.record["cost"]["expert_forward_passes"]


@pytest.mark.parametrize("family", ["deepseek_v2", "mixtral"])
def test_partly_cached_expert_outputs_and_small_chunks_equal_naive(family):
    """Where the expert outputs do not all fit: 3 of 8 cached, the rest recomputed per step, in
    7-token chunks and one-candidate groups (uneven last chunk): Algorithm 1 as written chooses the same."""
    model = make_tiny(family, seed=4)
    ids = _calib()
    tokens, hidden, inter = ids.numel(), model.config.hidden_size, moe_blocks(model)[0].expert_weights(0)[0].shape[0]
    memory = SearchMemory(work_bytes=7 * (4 * hidden * 6 + 12 * inter), cache_bytes=3 * tokens * hidden * 4)
    result = run_search(model, ids, SearchOptions(layers=1, experts=3), memory=memory)
    whole = run_search(model, ids, SearchOptions(layers=1, experts=3))  # all cached, one chunk
    for layer, found in result.record["expert_search"].items():
        assert found["step_scores"] == pytest.approx(whole.record["expert_search"][layer]["step_scores"], rel=1e-5)
    passes = 0
    for block in moe_blocks(model):
        all_gates, _ = recorded_gates(model, ids, block.layer_idx)
        expected = naive_experts(model, ids, block.layer_idx, 3, all_gates)
        assert result.record["expert_search"][str(block.layer_idx)]["experts"] == expected, f"layer {block.layer_idx}"
        # experts 0-2 computed once (cached); the others once per step while they are candidates
        passes += 3 + sum(sum(1 for e in range(3, 8) if e not in expected[:step]) for step in range(3))
    assert result.record["cost"]["expert_forward_passes"] == passes


@pytest.mark.parametrize(
    "options,message",
    [
        (SearchOptions(layers=9), "out of range"),
        (SearchOptions(layers=1, experts=9), "8 routed experts"),
        (SearchOptions(layers=1, metric="cos"), "unknown --metric"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(CdmoeError, match=message):
        run_search(make_tiny("deepseek_v2"), _calib(), options)


def test_shared_only_needs_shared_experts():
    with pytest.raises(CdmoeError, match="no.*shared|shared experts"):
        run_search(make_tiny("mixtral"), _calib(), SearchOptions(layers=1, experts=0))


def test_nan_activations_stop_with_the_layer_named():
    model = make_tiny("deepseek_v2")
    with torch.no_grad():
        model.model.layers[2].mlp.shared_experts.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(CdmoeError, match="NaN"):
        run_search(model, _calib(), SearchOptions(layers=1, experts=1))
