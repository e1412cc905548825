"""The fused condensed layer equals the unfused Eq. 3, and condensing validates its input."""

import pytest
import torch
from conftest import make_tiny

from cdmoe.errors import CdmoeError
from cdmoe.models.adapter import moe_blocks
from cdmoe.models.condensed import LayerChoice, condense_model, fuse_condensed_mlp


def unfused_eq3(block, experts, gates, x):
    """Eq. 3 term by term: shared expert (with its per-token gate, if any) + sum of g_i E_i(x)."""
    y = torch.zeros_like(x)
    if block.shared is not None:
        y = y + block.shared_output(x)
    for e, g in zip(experts, gates):
        y = y + g * block.expert_output(e, x)
    return y


@pytest.mark.parametrize("k", [0, 1, 3])
def test_fused_equals_unfused(family, k):
    model = make_tiny(family)
    block = moe_blocks(model)[-1]
    if block.shared is None and k == 0:
        pytest.skip("no shared expert: K=0 is rejected (tested below)")
    experts = tuple(range(7, 7 - k, -1))
    gates = tuple(0.1 + 0.2 * i for i in range(k))
    mlp = fuse_condensed_mlp(block, experts, gates)
    x = torch.randn(5, 7, model.config.hidden_size)
    with torch.no_grad():
        fused = mlp(x)
        ref = unfused_eq3(block, experts, gates, x.reshape(-1, x.shape[-1])).reshape(x.shape)
    torch.testing.assert_close(fused, ref, atol=2e-5, rtol=1e-4)
    expected_width = block.shared_intermediate_size + k * block.expert_intermediate_size
    assert mlp.gate_proj.weight.shape == (expected_width, model.config.hidden_size)
    assert (mlp.shared_gate is not None) == (block.shared_gate is not None)


def test_condensed_model_runs_the_fused_layer_in_place_of_the_block():
    model = make_tiny("qwen2_moe")
    layer = moe_blocks(model)[1]
    x_ids = torch.randint(0, 128, (2, 10))
    seen = {}
    layer.module.register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
    with torch.no_grad():
        model(input_ids=x_ids)
    choice = LayerChoice(layer=layer.layer_idx, experts=(2, 5), gates=(0.3, 0.4))
    expected = unfused_eq3(layer, choice.experts, choice.gates, seen["x"].reshape(-1, seen["x"].shape[-1]))
    condense_model(model, [choice])
    mlp = model.model.layers[layer.layer_idx].mlp
    with torch.no_grad():
        got = mlp(seen["x"]).reshape(expected.shape)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert type(model).__name__ == "CondensedQwen2MoeForCausalLM"
    assert model.config.cdmoe["condensed_layers"][str(layer.layer_idx)]["gated_width"] == 48


@pytest.mark.parametrize(
    "family,choice,message",
    [
        ("deepseek_v2", LayerChoice(layer=0, experts=(1,), gates=(0.5,)), "not a sparse MoE layer"),
        ("deepseek_v2", LayerChoice(layer=9, experts=(1,), gates=(0.5,)), "out of range"),
        ("deepseek_v2", LayerChoice(layer=1, experts=tuple(range(9)), gates=(0.1,) * 9), "choose K <= 8"),
        ("deepseek_v2", LayerChoice(layer=1, experts=(8,), gates=(0.1,)), "ids 0..7"),
        ("mixtral", LayerChoice(layer=1, experts=(), gates=()), "no shared expert"),
    ],
)
def test_bad_choices_are_rejected(family, choice, message):
    with pytest.raises(CdmoeError, match=message):
        condense_model(make_tiny(family), [choice])
