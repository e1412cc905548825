"""One checkpoint for any mix: pruned layers (each its own expert count), condensed and dropped layers.

A pruned block is checked against the family's own block with its router restricted to the kept rows
(the other experts' router logits, and correction bias, at -inf); a mixed model saved and loaded with
plain transformers (also where cdmoe cannot be imported) against the in-memory logits; the uniform case
against the family's native format."""

import json

import pytest
import torch
from conftest import assert_loads_without_cdmoe, make_tiny
from naive_reference import restricted_routing
from transformers import AutoModelForCausalLM

import cdmoe
from cdmoe.errors import CdmoeError
from cdmoe.models.adapter import moe_blocks
from cdmoe.models.mixed import LayerAction, apply_plan, build_block, check_prune, prune_sizes, salient_experts

FAMILIES = ["deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "glm4_moe"]
GROUPED = {"n_group": 2, "topk_group": 1}  # group-limited routing with 4 experts per group (deepseek_v3, glm4_moe)


def tiny(name, **overrides):
    extra = GROUPED if name in ("deepseek_v3", "glm4_moe") else {}
    return make_tiny(name, seed=5, **{**extra, **overrides})


@pytest.mark.parametrize("name", FAMILIES)
def test_pruned_block_is_the_original_with_its_router_restricted_routing(name, monkeypatch):
    model = tiny(name)
    block = moe_blocks(model)[-1]
    sizes, why = prune_sizes(block, (0.75, 0.5))
    assert sizes == [6, 4] and (why is None) == (block.routing_groups == 1)
    scores = torch.rand(block.num_experts, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    for size in sizes:
        kept = salient_experts(scores, size, block.routing_groups)
        pruned = build_block(block, LayerAction("prune", kept))
        assert pruned is not block.module and block.num_experts == 8  # the original is untouched
        expected = restricted_routing(lambda: block.module(x), {block.layer_idx: list(kept)}, [block], monkeypatch)
        got = pruned(x)
        got, expected = (t[0] if isinstance(t, tuple) else t for t in (got, expected))
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(got, block.module(x)[0] if isinstance(block.module(x), tuple) else block.module(x),
                                  atol=1e-4)  # the restriction changes the output


def test_group_limited_pruning_keeps_groups_equal():
    scores = torch.tensor([9.0, 1, 2, 3, 8, 7, 6, 5])  # group 0 = experts 0..3, group 1 = 4..7
    assert salient_experts(scores, 4, groups=2) == (0, 3, 4, 5)
    assert salient_experts(scores, 4, groups=1) == (0, 4, 5, 6)
    block = moe_blocks(tiny("deepseek_v3"))[0]
    with pytest.raises(CdmoeError, match="same number of experts kept in each"):
        check_prune(block, (0, 4, 5, 6))
    with pytest.raises(CdmoeError, match="top-k"):
        check_prune(moe_blocks(tiny("mixtral"))[0], (3,))


def _mixed_plan(model):
    """Two pruned layers with different counts, one condensed (K = 2), one dropped."""
    layers = [b.layer_idx for b in moe_blocks(model)]
    assert len(layers) >= 4
    shared = moe_blocks(model)[0].shared is not None
    groups = moe_blocks(model)[0].routing_groups
    return {layers[0]: LayerAction("prune", (0, 2, 3, 5, 6, 7) if groups == 1 else (0, 1, 3, 4, 6, 7)),
            layers[1]: LayerAction("condense", (4, 1) if not shared else (4,), (0.3, 0.2) if not shared else (0.4,)),
            layers[2]: LayerAction("prune", (1, 2, 5, 6)),
            layers[3]: LayerAction("drop")}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", FAMILIES)
def test_mixed_checkpoint_loads_plainly_with_the_in_memory_logits(name, tmp_path, monkeypatch):
    model = tiny(name, num_hidden_layers=5)
    plan = _mixed_plan(model)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    reference = tiny(name, num_hidden_layers=5)  # the original, each action done by hand on its own blocks
    blocks = {b.layer_idx: b for b in moe_blocks(reference)}
    swapped = {layer: build_block(blocks[layer], a) for layer, a in plan.items() if a.kind in ("condense", "drop")}
    from cdmoe.methods.ablations import swapped_blocks

    with swapped_blocks(reference, swapped):
        expected = restricted_routing(lambda: _logits(reference, ids), {layer: list(a.experts) for layer, a in plan.items()
                                                                if a.kind == "prune"}, blocks.values(), monkeypatch)
    apply_plan(model, plan)
    torch.testing.assert_close(_logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    config = model.config.cdmoe
    pruned = {int(k): v["num_experts"] for k, v in config["pruned_experts"].items()}
    assert pruned == {layer: len(a.experts) for layer, a in plan.items() if a.kind == "prune"}
    assert set(config["condensed_layers"]) == {str(layer) for layer, a in plan.items() if a.kind == "condense"}
    out = cdmoe.save(model, tmp_path / "out", {"method": "budget"})
    loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    counts = {layer: len(plan[layer].experts) if layer in plan else 8 for layer in blocks
              if plan.get(layer, LayerAction()).kind in ("keep", "prune")}
    assert {b.layer_idx: b.num_experts for b in moe_blocks(loaded)} == counts
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3"])
def test_mixed_checkpoint_loads_where_cdmoe_is_not_installed(name, tmp_path):
    model = tiny(name, num_hidden_layers=5)
    apply_plan(model, _mixed_plan(model))
    ids = torch.randint(0, 128, (2, 12))
    expected = _logits(model, ids)
    out = cdmoe.save(model, tmp_path / "out", {"method": "budget"})
    assert "OK Condensed" in assert_loads_without_cdmoe(out, ids, expected, tmp_path)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_uniform_pruning_is_written_in_the_family_format(name, tmp_path):
    model = tiny(name)
    layers = [b.layer_idx for b in moe_blocks(model)]
    plan = {layer: LayerAction("prune", (1, 2, 4, 7)) for layer in layers}
    if name == "qwen3_moe":  # K * I = 3 * 32 = 96 = intermediate_size: a condensed layer the family expresses too
        plan[layers[0]] = LayerAction("condense", (0, 3, 5), (0.3, 0.2, 0.1))
    ids = torch.randint(0, 128, (1, 10))
    apply_plan(model, plan)
    expected = _logits(model, ids)
    out = cdmoe.save(model, tmp_path / "out", {"method": "budget"})
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == name and "cdmoe" not in config and not (out / "modeling_cdmoe.py").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert {b.num_experts for b in moe_blocks(loaded)} == {4}
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=1e-5, rtol=1e-5)
