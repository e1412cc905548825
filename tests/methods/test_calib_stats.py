"""The baselines' ranking statistics and choices against direct computations (issue #18 point 2).

Each statistic of :func:`cdmoe.methods.calib_stats.calibration_stats` is recomputed here from the
model's own forward pass (``output_hidden_states``, a layer's MoE block swapped for zero, the
router's logits from the block input) in float64, and Expert Drop's kept experts and M-SMoE's
groups are derived from those direct values, not from cdmoe's own output.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny

from cdmoe.methods.ablations import DroppedBlock, swapped_blocks
from cdmoe.methods.calib_stats import calibration_stats
from cdmoe.methods.expert_drop import expert_drop_plans
from cdmoe.methods.msmoe import msmoe_restricted_plans
from cdmoe.models.adapter import moe_blocks


@pytest.fixture(scope="module")
def setup():
    model = make_tiny("qwen2_moe", seed=4, num_hidden_layers=5)  # softmax routing, top-2 of 8, no groups
    ids = torch.randint(0, 128, (6, 20), generator=torch.Generator().manual_seed(5))
    return model, ids, calibration_stats(model, ids, batch_size=4)


def mean_cos(a, b):
    a, b = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
    return float((a * b).sum(-1).div(a.norm(dim=-1) * b.norm(dim=-1)).mean())


@torch.no_grad()
def hidden_states(model, ids):
    return model(input_ids=ids, output_hidden_states=True).hidden_states  # embeddings, then each layer's output


@torch.no_grad()
def router_inputs(model, ids):
    """{MoE layer: (tokens, H) input of its MoE block}, captured from the model's own forward."""
    seen = {}
    hooks = [b.module.register_forward_pre_hook(lambda m, a, i=b.layer_idx: seen.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
             for b in moe_blocks(model)]
    model(input_ids=ids)
    for h in hooks:
        h.remove()
    return seen


def test_block_and_moe_cosines_equal_direct_computations(setup):
    model, ids, stats = setup
    hs = hidden_states(model, ids)
    last = len(hs) - 2  # hidden_states' last entry is after the final norm: compare layers before it
    for i in range(last):
        assert stats.block_cosine[i] == pytest.approx(mean_cos(hs[i], hs[i + 1]), rel=1e-5, abs=1e-6)
    for block in moe_blocks(model):
        i = block.layer_idx
        if i >= last:
            continue
        with swapped_blocks(model, {i: DroppedBlock()}):
            without = hidden_states(model, ids)[i + 1]  # the residual stream before the MoE add
        assert stats.moe_cosine[i] == pytest.approx(mean_cos(without, hs[i + 1]), rel=1e-5, abs=1e-6)


def test_routing_sums_counts_and_logit_similarity_equal_direct_computations(setup):
    model, ids, stats = setup
    inputs = router_inputs(model, ids)
    for block in moe_blocks(model):
        x = inputs[block.layer_idx].double()
        logits = x @ block.router_weight.double().T  # (tokens, E)
        probs = logits.softmax(-1)
        torch.testing.assert_close(stats.score_sums[block.layer_idx], probs.sum(0), rtol=1e-5, atol=1e-6)
        top = probs.topk(block.top_k, dim=-1).indices
        assert stats.counts[block.layer_idx].tolist() == torch.bincount(top.reshape(-1), minlength=block.num_experts).tolist()
        cos = F.normalize(logits.T, dim=-1) @ F.normalize(logits.T, dim=-1).T  # experts' logit vectors over tokens
        torch.testing.assert_close(stats.logit_similarity(block.layer_idx), cos, rtol=1e-5, atol=1e-6)


def test_expert_drop_keeps_the_highest_scored_experts_and_msmoe_restricted_groups_by_logit_similarity(setup):
    model, ids, stats = setup
    inputs = router_inputs(model, ids)
    kept = 4
    drops = {p.layer: p for p in expert_drop_plans(model, stats, kept)}
    merges = {p.layer: p for p in msmoe_restricted_plans(model, stats, kept)}
    for block in moe_blocks(model):
        logits = inputs[block.layer_idx].double() @ block.router_weight.double().T
        probs = logits.softmax(-1)
        best = sorted(probs.sum(0).argsort(descending=True)[:kept].tolist())
        assert list(drops[block.layer_idx].router_rows) == best
        usage = torch.bincount(probs.topk(block.top_k, dim=-1).indices.reshape(-1), minlength=block.num_experts)
        dominant = sorted(sorted(range(block.num_experts), key=lambda e: (-int(usage[e]), e))[:kept])
        plan = merges[block.layer_idx]
        assert list(plan.router_rows) == dominant
        cos = F.normalize(logits.T, dim=-1) @ F.normalize(logits.T, dim=-1).T
        for e in range(block.num_experts):
            want = dominant.index(e) if e in dominant else int(cos[e, dominant].argmax())
            assert int(plan.mix[:, e].nonzero().flatten()[0]) == want, (block.layer_idx, e)
        for j, row in enumerate(plan.mix):  # usage-weighted average over the group
            members = [e for e in range(block.num_experts) if plan.mix[j, e] > 0]
            weights = usage[members].double()
            if weights.sum() > 0:
                torch.testing.assert_close(row[members], weights / weights.sum())
