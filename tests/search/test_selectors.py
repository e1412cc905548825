"""Non-greedy expert and layer selectors (the paper's ablations) choose what their rules say."""

import pytest
import torch
from conftest import make_tiny

from cdmoe.errors import CdmoeError
from cdmoe.models.adapter import moe_blocks
from cdmoe.search.run import SearchOptions, run_search
from cdmoe.search.selectors import expert_alphas, hill_alpha


def _calib():
    return torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(0))


def _search(model, **kwargs):
    return run_search(model, _calib(), SearchOptions(layers=2, experts=2, **kwargs))


def test_l1_selector_keeps_the_lowest_norm_experts():
    model = make_tiny("deepseek_v2", seed=1)
    result = _search(model, expert_selector="l1")
    for block in moe_blocks(model):
        norms = [float(sum(w.detach().abs().sum() for w in block.expert_weights(e))) for e in range(block.num_experts)]
        expected = sorted(range(block.num_experts), key=norms.__getitem__)[:2]
        assert result.record["expert_search"][str(block.layer_idx)]["experts"] == expected


def test_frequency_selector_keeps_the_most_routed_experts():
    model = make_tiny("qwen2_moe", seed=2)
    result = _search(model, expert_selector="frequency")
    for layer, found in result.record["expert_search"].items():
        counts = found["token_counts"]
        top = sorted(range(len(counts)), key=lambda e: (-counts[e], e))[:2]
        assert found["experts"] == top


def test_random_selector_is_seeded():
    model = make_tiny("mixtral", seed=3)
    a, b = _search(model, expert_selector="random"), _search(model, expert_selector="random")
    c = _search(model, expert_selector="random", seed=1)
    def experts(result):
        return [v["experts"] for v in result.record["expert_search"].values()]

    assert a.choices == b.choices and experts(a) == experts(b)
    assert experts(a) != experts(c)  # another seed, other experts (deterministic for these seeds)


def test_layer_rank_orders_by_the_layer_level_divergence():
    model = make_tiny("deepseek_v2", seed=4, num_hidden_layers=5)
    result = _search(model, layer_selector="layer-rank")
    own = {int(k): v["step_scores"][-1] for k, v in result.record["expert_search"].items()}
    assert result.record["layer_order"] == sorted(own, key=own.get)[:2]


def test_global_layer_rank_is_the_first_greedy_step_ranked():
    model = make_tiny("deepseek_v2", seed=4, num_hidden_layers=5)
    ranked = _search(model, layer_selector="global-layer-rank")
    greedy = _search(model)
    single = {int(k): v for k, v in greedy.record["single_layer_scores"].items()}
    assert ranked.record["layer_order"] == sorted(single, key=single.get)[:2]
    assert ranked.record["layer_order"][0] == greedy.record["layer_order"][0]


def test_unknown_selectors_are_rejected():
    with pytest.raises(CdmoeError, match="expert-selector"):
        _search(make_tiny("deepseek_v2"), expert_selector="pl_alpha")
    with pytest.raises(CdmoeError, match="layer-selector"):
        _search(make_tiny("deepseek_v2"), layer_selector="best")


@pytest.mark.parametrize("alpha", [2.5, 4.0])
def test_hill_estimator_recovers_a_power_law_exponent(alpha):
    # eigenvalues drawn from p(x) ~ x^-alpha on x >= 1 (inverse CDF), plus a thin log-uniform bulk
    # below 1: the log-histogram peaks where the power law starts, where Fix-Finger puts x_min
    gen = torch.Generator().manual_seed(0)
    tail = (1 - torch.rand(20000, generator=gen, dtype=torch.float64)) ** (-1 / (alpha - 1))
    bulk = 10 ** (-3 * torch.rand(2000, generator=gen, dtype=torch.float64))
    estimate = hill_alpha(torch.cat([bulk, tail]))
    assert abs(estimate - alpha) < 0.15 * alpha


def test_pl_alpha_hill_selector_keeps_the_most_heavy_tailed_experts():
    model = make_tiny("deepseek_v2", seed=3)
    block = moe_blocks(model)[0]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # expert 5: weights with a few huge singular values (a heavy tail)
        for w in block.expert_weights(5):
            u, _, v = torch.linalg.svd(w.double())
            s = torch.logspace(2, -2, min(w.shape), dtype=torch.float64) * (1 + 0.01 * torch.rand(min(w.shape), generator=gen))
            w.copy_((u[:, : s.numel()] * s) @ v[: s.numel()])
    alphas = expert_alphas(block)
    assert int(alphas.argmin()) == 5
    result = _search(model, expert_selector="pl-alpha-hill")
    kept = result.record["expert_search"][str(block.layer_idx)]["experts"]
    assert kept == sorted(range(block.num_experts), key=lambda e: (float(alphas[e]), e))[:2] and 5 in kept
