"""Baselines: each against an independent computation on the original model."""

import json

import pytest
import torch
from conftest import DEMO_CALIB, make_tiny

from cdmoe.errors import CdmoeError
from cdmoe.methods.baselines import BaselineOptions, apply_baseline, run_baseline
from cdmoe.methods.calib_stats import calibration_stats
from cdmoe.methods.expert_reduce import ExpertPlan, reduce_experts
from cdmoe.methods.layer_drop import drop_blocks, drop_layers
from cdmoe.methods.msmoe import msmoe_restricted_plans
from cdmoe.models.adapter import decoder_layers, family_spec, moe_blocks
from cdmoe.models.budget import model_params, tensor_count
from cdmoe.models.loading import load_model
from cdmoe.search.calibration import CalibSpec

FAMILIES = ["deepseek_v2", "qwen2_moe", "mixtral", "deepseek_v3"]


def ids_for(model, n=2, s=12, seed=0):
    return torch.randint(0, model.config.vocab_size, (n, s), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("name", FAMILIES)
def test_layer_drop_equals_zeroed_mlp(name):
    model = make_tiny(name)
    ids = ids_for(model)
    layer = moe_blocks(model)[-1].layer_idx
    block = getattr(decoder_layers(model, family_spec(model))[layer], family_spec(model).block_attr)
    hook = block.register_forward_hook(lambda m, a, out: torch.zeros_like(out[0] if isinstance(out, tuple) else out))
    reference = logits(model, ids)
    hook.remove()
    assert not torch.allclose(reference, logits(model, ids))  # the layer mattered
    dropped = drop_layers(model, [layer])
    torch.testing.assert_close(logits(dropped, ids), reference)


@pytest.mark.parametrize("name", FAMILIES)
def test_block_drop_equals_identity_layer(name):
    model = make_tiny(name)
    ids = ids_for(model)
    target = 1
    layer = decoder_layers(model, family_spec(model))[target]
    hook = layer.register_forward_hook(
        lambda m, args, kwargs, out: (args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    reference = logits(model, ids)
    hook.remove()
    n = len(decoder_layers(model, family_spec(model)))
    dropped = drop_blocks(model, [target])
    assert len(decoder_layers(dropped, family_spec(dropped))) == n - 1
    torch.testing.assert_close(logits(dropped, ids), reference)


@pytest.mark.parametrize("name", ["deepseek_v2", "qwen2_moe", "mixtral", "olmoe"])
def test_expert_drop_keeping_all_experts_in_any_order_equals_original(name):
    model = make_tiny(name)
    ids = ids_for(model)
    reference = logits(model, ids)
    plans = []
    for block in moe_blocks(model):
        perm = torch.randperm(block.num_experts, generator=torch.Generator().manual_seed(block.layer_idx))
        mix = torch.zeros(block.num_experts, block.num_experts, dtype=torch.float64)
        mix[torch.arange(block.num_experts), perm] = 1.0
        plans.append(ExpertPlan(block.layer_idx, mix, tuple(perm.tolist())))
    reduced = reduce_experts(model, plans)
    torch.testing.assert_close(logits(reduced, ids), reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["qwen3_moe", "olmoe", "qwen2_moe", "mixtral", "deepseek_v2"])
def test_expert_drop_to_fewer_experts_keeps_exactly_the_chosen_ones(name):
    """E' < E: the config says E', every block has E' experts, expert j is old expert keep[j] and the
    router has the kept rows (qwen3_moe's config stores the count as num_local_experts)."""
    model = make_tiny(name)
    plans = []
    for block in moe_blocks(model):
        keep = sorted(torch.randperm(block.num_experts, generator=torch.Generator().manual_seed(3))[:3].tolist())
        mix = torch.zeros(3, block.num_experts, dtype=torch.float64)
        mix[torch.arange(3), torch.tensor(keep)] = 1.0
        plans.append(ExpertPlan(block.layer_idx, mix, tuple(keep)))
    reduced = reduce_experts(model, plans)
    spec = family_spec(reduced)
    assert {getattr(reduced.config, k) for k in spec.num_experts_keys if getattr(reduced.config, k, None)} == {3}
    for plan, old, new in zip(plans, moe_blocks(model), moe_blocks(reduced)):
        assert new.num_experts == 3
        torch.testing.assert_close(new.router_weight, old.router_weight[list(plan.router_rows)], rtol=0, atol=0)
        for j, e in enumerate(plan.router_rows):
            for new_w, old_w in zip(new.expert_weights(j), old.expert_weights(e), strict=True):
                torch.testing.assert_close(new_w, old_w, rtol=0, atol=0)
    assert reduced(input_ids=ids_for(reduced), use_cache=False).logits.shape[-1] == model.config.vocab_size


def test_msmoe_restricted_groups_and_merged_weights():
    model = make_tiny("deepseek_v2")
    stats = calibration_stats(model, ids_for(model, n=4, s=16))
    kept = 3
    plans = msmoe_restricted_plans(model, stats, kept)
    reduced = reduce_experts(model, plans)
    for plan, old, new in zip(plans, moe_blocks(model), moe_blocks(reduced)):
        counts = stats.counts[plan.layer]
        top = sorted(range(old.num_experts), key=lambda e: (-int(counts[e]), e))[:kept]
        assert sorted(plan.router_rows) == sorted(top)
        assert (plan.mix > 0).sum(0).le(1).all() and torch.allclose(plan.mix.sum(1), torch.ones(kept, dtype=torch.float64))
        torch.testing.assert_close(new.router_weight, old.router_weight[list(plan.router_rows)])
        for j in range(kept):
            members = [(e, float(w)) for e, w in enumerate(plan.mix[j]) if w > 0]
            for new_w, *old_ws in zip(new.expert_weights(j), *(old.expert_weights(e) for e, _ in members)):
                expected = sum(w * t.double() for (_, w), t in zip(members, old_ws))
                torch.testing.assert_close(new_w.double(), expected, atol=1e-6, rtol=1e-5)
        assert new.num_experts == kept


@pytest.mark.parametrize("method,kw", [("layer-drop", {"layers": 2}), ("block-drop", {"layers": 2}),
                                       ("expert-drop", {"keep_experts": 5}), ("reap", {"keep_experts": 5}),
                                       ("msmoe", {"keep_experts": 5}),
                                       ("msmoe-restricted", {"keep_experts": 5})])
def test_baseline_output_loads_and_matches_its_plan(tiny_model_dir, tmp_path, method, kw):
    out = tmp_path / method
    record = run_baseline(tiny_model_dir, out, BaselineOptions(method, **kw), CalibSpec(str(DEMO_CALIB), 4, 32, 0))
    saved = json.loads((out / "cdmoe.json").read_text())
    assert saved["method"] == method and saved["params"] == record["params"]
    loaded = load_model(out)
    assert tensor_count(loaded) == saved["baseline"]["predicted_params"] == saved["params"]["condensed_params"]
    assert saved["params"]["condensed_params"] < saved["params"]["total_params"]
    plain = __import__("transformers").AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).float()
    ids = ids_for(loaded)
    torch.testing.assert_close(logits(plain, ids), logits(loaded, ids))


def test_layer_drop_picks_the_most_similar_layers():
    model = make_tiny("qwen2_moe")
    stats = calibration_stats(model, ids_for(model, n=2, s=16))
    model2, details = apply_baseline(model, stats, BaselineOptions("layer-drop", layers=1))
    best = max(stats.moe_cosine, key=stats.moe_cosine.get)
    assert details["layers"] == [best]
    assert details["predicted_params"] == model_params(model2).total


def test_bad_baseline_options():
    with pytest.raises(CdmoeError, match="needs --layers"):
        BaselineOptions("layer-drop").validate()
    with pytest.raises(CdmoeError, match="unknown baseline"):
        BaselineOptions("prune").validate()
    model = make_tiny("deepseek_v2")
    stats = calibration_stats(model, ids_for(model))
    with pytest.raises(CdmoeError, match="out of range"):
        apply_baseline(model, stats, BaselineOptions("expert-drop", keep_experts=1))


def test_unreadable_calibration_is_refused_before_the_weights_load(tiny_model_dir, tmp_path, monkeypatch):
    import cdmoe.methods.baselines as baselines

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(baselines, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    with pytest.raises(CdmoeError, match="cannot read calibration dataset"):
        run_baseline(tiny_model_dir, tmp_path / "out", BaselineOptions("expert-drop", keep_experts=5),
                     CalibSpec("no-such-org/no-such-dataset", 4, 32, 0))
    assert not (tmp_path / "out").exists()
