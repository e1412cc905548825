"""REAP: the saliency against a literal per-token loop over the family's own router and experts, the
kept experts, and the pruned checkpoint against the original whose routers are restricted to the kept rows."""

import json

import pytest
import torch
from conftest import DEMO_CALIB, make_tiny
from naive_reference import restricted_routing
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from cdmoe.checkpoint.writer import save
from cdmoe.cli import app
from cdmoe.methods.baselines import BaselineOptions, apply_baseline, baseline_record
from cdmoe.methods.calib_stats import calibration_stats
from cdmoe.methods.reap import expert_saliency, reap_plans
from cdmoe.models.adapter import family_spec, moe_blocks

# softmax renormalised (mixtral), sigmoid + correction bias + group limits + routed scaling 2.5 (deepseek_v3),
# a per-token gated shared expert (qwen2_moe), softmax with shared experts (deepseek_v2)
FAMILIES = ["mixtral", "deepseek_v3", "qwen2_moe", "deepseek_v2"]


def ids_for(model, n=4, s=10, seed=1):
    return torch.randint(0, model.config.vocab_size, (n, s), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def literal_saliency(model, ids):
    """{MoE layer: (E,) float64}: one token at a time, the family's own router output (its top-k and the
    weights it multiplies the experts by, divided by the routed scaling factor) and each chosen expert's
    output from the family's own experts module given that one expert with weight 1."""
    spec = family_spec(model)
    blocks = {b.layer_idx: b for b in moe_blocks(model)}
    seen, hooks = {}, []
    for i, block in blocks.items():
        hooks.append(block.module.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(("x", i), args[0])))
        hooks.append(block.router.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(("r", i), out)))
    model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    scale = float(getattr(model.config, "routed_scaling_factor", None) or 1.0)
    out = {}
    for i, block in blocks.items():
        x = seen[("x", i)].reshape(-1, seen[("x", i)].shape[-1])
        _, weights, indices = seen[("r", i)]  # the family router's (logits, top-k weights, top-k indices)
        experts = getattr(block.module, spec.experts_attr)
        sums = [0.0] * block.num_experts
        counts = [0] * block.num_experts
        for t in range(x.shape[0]):
            for k in range(indices.shape[1]):
                j = int(indices[t, k])
                f = experts(x[t : t + 1], torch.tensor([[j]]), torch.ones(1, 1))  # f_j(x_t), ungated
                sums[j] += float(weights[t, k]) / scale * float(f.double().norm())
                counts[j] += 1
        out[i] = torch.tensor([s / c if c else 0.0 for s, c in zip(sums, counts)], dtype=torch.float64)
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_saliency_equals_literal_per_token_loop(name):
    model = make_tiny(name, seed=3)
    ids = ids_for(model)
    reference = literal_saliency(model, ids)
    stats = calibration_stats(model, ids, batch_size=3, reap=True)  # two batches: sums and counts carry over
    assert set(stats.reap) == set(reference)
    for layer, expected in reference.items():
        torch.testing.assert_close(stats.reap[layer].mean(), expected, rtol=1e-5, atol=1e-7)
        assert int(stats.reap[layer].counts.sum()) == ids.numel() * moe_blocks(model)[0].top_k
    assert all(len(set(s.tolist())) > 2 for s in reference.values())  # the experts' saliencies differ
    # one layer from its inputs alone, in chunks of 3 tokens (a tiny budget), gives the same
    block = moe_blocks(model)[-1]
    seen = {}
    hook = block.module.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    hook.remove()
    hidden, inter = block.router_weight.shape[1], block.expert_intermediate_size
    small = expert_saliency(block, seen["x"], budget_bytes=3 * 4 * (2 * block.num_experts + 2 * hidden + 3 * inter))
    torch.testing.assert_close(small.mean(), reference[block.layer_idx], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["deepseek_v3", "qwen2_moe"])
def test_reap_keeps_the_most_salient_experts(name):
    model = make_tiny(name, seed=3, n_group=1, topk_group=1)
    ids = ids_for(model)
    reference = literal_saliency(model, ids)
    kept = 5
    plans = reap_plans(model, calibration_stats(model, ids, reap=True).reap, kept)
    for plan in plans:
        ranked = sorted(range(len(reference[plan.layer])), key=lambda e: -float(reference[plan.layer][e]))
        assert plan.router_rows == tuple(sorted(ranked[:kept]))
        assert float(reference[plan.layer][ranked[kept - 1]]) > float(reference[plan.layer][ranked[kept]])  # no tie


def restricted_logits(model, kept: dict[int, list[int]], ids, monkeypatch):
    """The original model through its family's own code, every router restricted to the kept rows
    (:func:`naive_reference.restricted_routing`): softmax / renormalisation run over the kept experts only."""
    return restricted_routing(lambda: model(input_ids=ids, use_cache=False).logits, kept, moe_blocks(model), monkeypatch)


@pytest.mark.parametrize("name", FAMILIES)
def test_pruned_checkpoint_loads_plainly_and_routes_as_the_restricted_original(name, tmp_path, monkeypatch):
    model = make_tiny(name, seed=3, n_group=1, topk_group=1)
    ids = ids_for(model, n=2, s=12, seed=9)
    stats = calibration_stats(model, ids_for(model), reap=True)
    pruned, details = apply_baseline(model, stats, BaselineOptions("reap", keep_experts=5))
    out = save(pruned, tmp_path / "out", baseline_record(pruned, "tiny", "reap", details))
    plain = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()  # the family's own class
    assert plain.config.model_type == model.config.model_type and type(plain).__module__.startswith("transformers.")
    assert [b.num_experts for b in moe_blocks(plain)] == [5] * len(moe_blocks(model))
    kept = {p["layer"]: p["router_rows"] for p in json.loads((out / "cdmoe.json").read_text())["baseline"]["plans"]}
    expected = restricted_logits(make_tiny(name, seed=3, n_group=1, topk_group=1), kept, ids, monkeypatch)
    with torch.no_grad():
        got = plain(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the restriction matters: the unrestricted original differs
        assert not torch.allclose(model(input_ids=ids, use_cache=False).logits, expected, atol=1e-3)


def test_cli_baseline_reap(tiny_model_dir, tmp_path, monkeypatch):
    runner = CliRunner()
    calib = ["--calib", str(DEMO_CALIB), "--samples", "4", "--seq-len", "32"]
    result = runner.invoke(app, ["baseline", "reap", str(tiny_model_dir), "--out", str(tmp_path / "r"),
                                 "--keep-experts", "5", *calib])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "r" / "cdmoe.json").read_text())
    assert record["method"] == "reap" and record["baseline"]["keep_experts"] == 5
    for plan in record["baseline"]["plans"]:
        saliency = record["baseline"]["saliency"][str(plan["layer"])]["saliency"]
        assert min(saliency[e] for e in plan["router_rows"]) >= max(
            s for e, s in enumerate(saliency) if e not in plan["router_rows"])
    monkeypatch.setattr("cdmoe.methods.baselines.calibration_stats", lambda *a, **k: pytest.fail("calibrated first"))
    result = runner.invoke(app, ["baseline", "reap", str(tiny_model_dir), "--out", str(tmp_path / "bad"),
                                 "--keep-experts", "1", *calib])
    assert result.exit_code == 2 and "out of range" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "bad").exists()
