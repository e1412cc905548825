"""The adapter's routing and expert maths reproduce each family's own MoE block."""

import pytest
import torch
from conftest import make_tiny

from cdmoe.errors import CdmoeError
from cdmoe.models.adapter import family_spec, moe_blocks


def _capture_block(model, block, input_ids):
    seen = {}
    hooks = [
        block.module.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o[0] if isinstance(o, tuple) else o)),
        block.router.register_forward_hook(lambda m, i, o: seen.update(router=o)),
    ]
    with torch.no_grad():
        model(input_ids=input_ids)
    for h in hooks:
        h.remove()
    return seen


def test_routing_and_output_match_family_block(family):
    model = make_tiny(family)
    input_ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    for block in moe_blocks(model):
        seen = _capture_block(model, block, input_ids)
        x = seen["x"].reshape(-1, seen["x"].shape[-1])
        _, lib_gates, lib_idx = seen["router"][-3:]
        ours = block.route(x)
        # compare as sets per token: libraries return top-k unsorted
        lib_idx, order = lib_idx.sort(-1)
        our_idx, our_order = ours.indices.sort(-1)
        assert torch.equal(lib_idx, our_idx)
        torch.testing.assert_close(ours.gates.gather(1, our_order), lib_gates.float().gather(1, order))
        # the block output from our routing and our expert weights, token by token (Eq. 1)
        expected = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for e, g in zip(ours.indices[t].tolist(), ours.gates[t].tolist()):
                expected[t] += g * block.expert_output(e, x[t : t + 1])[0]
        if block.shared is not None:
            expected += block.shared_output(x)
        torch.testing.assert_close(expected, seen["y"].reshape(expected.shape), atol=2e-5, rtol=1e-4)


def test_routing_is_discriminating():
    """A wrong variant (renormalisation flipped) must not match, or the test above proves nothing."""
    model = make_tiny("mixtral")
    block = moe_blocks(model)[0]
    x = torch.randn(16, model.config.hidden_size)
    right = block.route(x).gates
    block.spec = type(block.spec)(**{**block.spec.__dict__, "routing": type(block.spec.routing)(renormalize="never")})
    wrong = block.route(x).gates
    assert (right - wrong).abs().max() > 0.05


def test_moe_layer_detection_follows_family_rules():
    assert [b.layer_idx for b in moe_blocks(make_tiny("deepseek_v2"))] == [1, 2, 3]  # first_k_dense_replace=1
    assert [b.layer_idx for b in moe_blocks(make_tiny("qwen3_moe", mlp_only_layers=[0, 2]))] == [1, 3]
    assert [b.layer_idx for b in moe_blocks(make_tiny("ernie4_5_moe"))] == [1, 2, 3]


def test_group_limited_routing_only_picks_kept_groups():
    model = make_tiny("deepseek_v3")
    block = moe_blocks(model)[0]
    routing = block.route(torch.randn(64, model.config.hidden_size))
    group_size = block.num_experts // model.config.n_group
    groups = routing.indices // group_size
    assert all(len(set(row.tolist())) <= model.config.topk_group for row in groups)


def test_dense_model_is_rejected():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=64))
    with pytest.raises(CdmoeError, match="no sparse MoE layer"):
        family_spec(model)
