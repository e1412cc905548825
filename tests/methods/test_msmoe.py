"""M-SMoE (``msmoe``) against a literal re-implementation of its reference code (issue #18 point 3).

The reference is MC-SMoE's ``mcsmoe/merging/grouping_mixtral.py`` (Li et al., arXiv 2310.01334).
Everything below is recomputed here from the raw router logits of the calibration tokens, in
float64, following that file step by step (``compute_all_usages``,
``_compute_all_similarities_by_router_logits``, ``_assign_num_groups_per_layer``,
``group_experts_globally_from_dominant_experts``, ``_merge_mlp_experts_by_usage_frequency_weighting``),
and the merged model is compared with the MC-SMoE forward: the full router's top-k over all E
experts, every expert's weights replaced by its group's usage-weighted average.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import DEMO_CALIB, ROOT, make_tiny
from fidelity_checks import digest, expected_untouched, tensors
from transformers import AutoModelForCausalLM

from cdmoe.errors import CdmoeError
from cdmoe.methods.baselines import BaselineOptions, run_baseline
from cdmoe.methods.calib_stats import calibration_stats
from cdmoe.methods.expert_reduce import merge_experts
from cdmoe.methods.msmoe import msmoe_plans
from cdmoe.models.adapter import moe_blocks
from cdmoe.models.budget import model_params, tensor_count
from cdmoe.models.loading import load_model
from cdmoe.models.plan import plan
from cdmoe.search.calibration import CalibSpec

FP32_EPS = 1e-6  # mcsmoe.utils.constants.FP32_EPS
# MC-SMoE divides a group's usage-weighted sum by (its usage + FP32_EPS); cdmoe by the usage alone (a true
# weighted average, documented in cdmoe.expert_reduce). The eps shrinks merged weights by up to ~1e-5
# relative, enough to move logits by 5e-5, so the reference merge here uses the exact average.
MERGE_EPS = 0.0


def calib_ids(model, n=6, s=24, seed=5):
    return torch.randint(0, model.config.vocab_size, (n, s), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def raw_router_logits(model, ids) -> dict[int, torch.Tensor]:
    """{MoE layer: (tokens, E) float64 router logits}, from the block inputs of the model's own forward."""
    seen = {}
    hooks = [b.module.register_forward_pre_hook(
        lambda m, a, i=b.layer_idx: seen.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1])))
        for b in moe_blocks(model)]
    for batch in ids.split(4):
        model(input_ids=batch, use_cache=False)
    for h in hooks:
        h.remove()
    return {b.layer_idx: torch.cat(seen[b.layer_idx]).double() @ b.router_weight.double().T for b in moe_blocks(model)}


def reference_grouping(logits: dict[int, torch.Tensor], top_k: int, num_average_groups: int):
    """MC-SMoE's grouping, literally: returns ({layer: group label per expert}, {layer: usage (E,)},
    {layer: core experts})."""
    usage = {}
    for layer, lg in logits.items():  # compute_all_usages (top-2 of the logits in Mixtral's file)
        selected = torch.topk(lg, top_k, dim=-1)[1].reshape(-1)
        unique, counts = torch.unique(selected, return_counts=True)
        u = torch.zeros(lg.shape[1], dtype=torch.float64)
        u[unique] += counts.double()
        usage[layer] = u / u.sum()
    num_experts = next(iter(logits.values())).shape[1]
    similarity = {}
    for layer, lg in logits.items():  # _compute_all_similarities_by_router_logits
        sim = torch.eye(num_experts, dtype=torch.float64)
        for i in range(num_experts):
            for j in range(i + 1, num_experts):
                s = (F.cosine_similarity(lg[:, i], lg[:, j], dim=-1, eps=FP32_EPS) + 1).item() / 2
                sim[i, j] = sim[j, i] = s
        similarity[layer] = sim
    # _assign_num_groups_per_layer, every layer merged
    boosted = {layer: u.clone() for layer, u in usage.items()}
    for u in boosted.values():
        u[torch.argmax(u)] = 1.0
    ordered = torch.sort(torch.cat(list(boosted.values())), descending=True)[0]
    total = num_average_groups * len(usage) - (1 if num_average_groups == num_experts else 0)
    threshold = ordered[total]
    num_groups = {layer: int(torch.sum(u > threshold)) for layer, u in boosted.items()}
    labels, cores = {}, {}
    for layer, u in usage.items():  # group_experts_globally_from_dominant_experts
        order = torch.argsort(u, descending=True, stable=True)  # MC-SMoE's argsort is unstable on ties
        core = order[: num_groups[layer]]
        label = torch.zeros(num_experts, dtype=torch.long)
        label[core] = torch.arange(num_groups[layer])
        for i in order[num_groups[layer]:]:
            label[i] = label[core[torch.argmax(similarity[layer][i, core])]]
        labels[layer], cores[layer] = label, set(core.tolist())
    return labels, usage, cores


def partition(labels) -> set[frozenset[int]]:
    return {frozenset(e for e, g in enumerate(labels) if g == j) for j in set(labels)}


@torch.no_grad()
def mcsmoe_model(model, labels, usage):
    """The MC-SMoE merged model: every expert's weights replaced by its group's usage-weighted
    average (``_merge_mlp_experts_by_usage_frequency_weighting``), the full router unchanged (in place)."""
    for block in moe_blocks(model):
        label, u = labels[block.layer_idx], usage[block.layer_idx]
        weights = {e: [w.detach().double().clone() for w in block.expert_weights(e)] for e in range(block.num_experts)}
        for g in label.unique():
            members = torch.where(label == g)[0].tolist()
            merged = [sum(u[e] * weights[e][p] for e in members) / (u[members].sum() + MERGE_EPS) for p in range(3)]
            for e in members:
                for target, value in zip(block.expert_weights(e), merged):
                    target.copy_(value)
    return model


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module")
def mixtral():
    """Tiny Mixtral (softmax top-2 of 8 experts, as MC-SMoE's file) where E'_l differs between layers."""
    model = make_tiny("mixtral", seed=2, num_hidden_layers=5)
    ids = calib_ids(model)
    return model, ids, calibration_stats(model, ids, batch_size=4)


@pytest.mark.parametrize("average", [2, 4, 6])
def test_groups_and_per_layer_counts_equal_the_reference_grouping(mixtral, average):
    model, ids, stats = mixtral
    labels, usage, cores = reference_grouping(raw_router_logits(model, ids), 2, average)
    plans = {p.layer: p for p in msmoe_plans(model, stats, average)}
    counts = {layer: len(set(label.tolist())) for layer, label in labels.items()}
    assert len(set(counts.values())) > 1, counts  # the global threshold gives the layers different E'_l
    assert {layer: len(p.mix) for layer, p in plans.items()} == counts
    for layer, p in plans.items():
        assert partition(p.expert_map) == partition(labels[layer].tolist()), layer
        members = torch.tensor(p.expert_map)
        for j, row in enumerate(p.mix):  # usage-weighted average over each group
            group = (members == j).nonzero().flatten()
            assert int(row.argmax()) in cores[layer] and set((row > 0).nonzero().flatten().tolist()) <= set(group.tolist())
            torch.testing.assert_close(row[group], usage[layer][group] / usage[layer][group].sum())


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v2", "qwen2_moe"])
def test_merged_model_equals_the_mcsmoe_forward_in_memory_and_after_loading(name, tmp_path):
    model = make_tiny(name, seed=2, num_hidden_layers=4)
    ids = calib_ids(model)
    stats = calibration_stats(model, ids, batch_size=4)
    first = moe_blocks(model)[0]
    labels, usage, _ = reference_grouping(raw_router_logits(model, ids), first.top_k, 4)
    probe = calib_ids(model, n=3, s=16, seed=9)
    chosen = {i: lg.topk(first.top_k, -1).indices for i, lg in raw_router_logits(model, probe).items()}
    shared = sum(int((labels[i][c[:, 0]] == labels[i][c[:, 1]]).sum()) for i, c in chosen.items())
    assert shared > 0  # some tokens pick two experts of one group: both gates go to the merged expert
    reference = logits(mcsmoe_model(make_tiny(name, seed=2, num_hidden_layers=4), labels, usage), probe)
    merged = merge_experts(model, msmoe_plans(model, stats, 4))
    torch.testing.assert_close(logits(merged, probe), reference, atol=2e-5, rtol=1e-4)
    merged.save_pretrained(tmp_path / "out")
    for loaded in (load_model(tmp_path / "out"), AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)):
        torch.testing.assert_close(logits(loaded.float(), probe), reference, atol=2e-5, rtol=1e-4)


def test_output_is_smaller_counts_right_and_keeps_untouched_tensors_bit_identical(tmp_path):
    """On the bf16 demo model: only E'_l experts stored per layer, the predicted parameter count is the
    stored one (record, model_params, ``cdmoe plan`` of the output), and every tensor but the merged
    experts (routers, shared experts, attention, ...) is the source's bytes and dtype."""
    source = ROOT / "demo" / "model"
    out = tmp_path / "msmoe"
    record = run_baseline(source, out, BaselineOptions("msmoe", keep_experts=8), CalibSpec(str(DEMO_CALIB), 4, 32, 0))
    per_layer = {int(k): v for k, v in record["baseline"]["experts_per_layer"].items()}
    assert len(set(per_layer.values())) > 1 and sum(per_layer.values()) <= 8 * len(per_layer)
    config = json.loads((out / "config.json").read_text())
    assert {int(k): v["num_experts"] for k, v in config["cdmoe"]["merged_experts"].items()} == per_layer
    written, original = tensors(out), expected_untouched(tensors(source), set())
    experts = {f"model.layers.{i}.mlp.experts.{p}" for i in per_layer for p in ("gate_up_proj", "down_proj")}
    assert set(written) == set(original)
    for name, tensor in written.items():
        if name in experts:
            layer = int(name.split(".")[2])
            assert tensor.shape[0] == per_layer[layer] and tensor.dtype == original[name].dtype, name
        else:
            assert digest(tensor) == digest(original[name]), name
    loaded = load_model(out)
    stored = tensor_count(loaded)
    assert stored == record["baseline"]["predicted_params"] == record["params"]["condensed_params"]
    assert model_params(loaded).total == stored == plan(out)["total_params"]
    assert [layer.num_experts for layer in model_params(loaded).layers] == [per_layer[i] for i in sorted(per_layer)]
    on_disk = sum(t.numel() * t.element_size() for t in written.values())
    source_bytes = sum(t.numel() * t.element_size() for t in tensors(source).values())
    assert on_disk < source_bytes and on_disk == stored * 2  # bf16 throughout


def test_msmoe_refuses_an_average_too_large_for_the_threshold(mixtral):
    model, _, stats = mixtral
    with pytest.raises(CdmoeError, match="out of range"):
        msmoe_plans(model, stats, 9)


def test_remote_code_family_with_one_module_per_expert(tmp_path):
    """DeepSeekMoE-16B's layout (remote code, ``nn.ModuleList`` of experts, its own MoE forward):
    the merged model equals the MC-SMoE forward, and so does its saved checkpoint loaded with
    plain ``trust_remote_code``."""
    from conftest import remote_code_checkpoint

    base = remote_code_checkpoint(tmp_path / "base")

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, attn_implementation="eager").eval()

    model = load(base)
    ids = calib_ids(model)
    labels, usage, _ = reference_grouping(raw_router_logits(model, ids), moe_blocks(model)[0].top_k, 3)
    probe = calib_ids(model, n=3, s=16, seed=9)
    reference = logits(mcsmoe_model(load(base), labels, usage), probe)
    merged = merge_experts(model, msmoe_plans(model, calibration_stats(model, ids, batch_size=4), 3))
    assert [len(b.module.experts) for b in moe_blocks(merged)] == [len(set(labels[i].tolist())) for i in sorted(labels)]
    torch.testing.assert_close(logits(merged, probe), reference, atol=2e-5, rtol=1e-4)
    merged.save_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(load(tmp_path / "out"), probe), reference, atol=2e-5, rtol=1e-4)
