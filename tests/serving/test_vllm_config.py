"""The plugin's config resolution, in the main environment (no vLLM needed): what vLLM would be told
to build from a condensed ``config.json``, and the one-line refusals of what it cannot serve exactly."""

import sys

import pytest
import torch
from conftest import ROOT, make_tiny

sys.path.insert(0, str(ROOT / "plugins" / "vllm" / "src"))
from cdmoe_vllm.config import SUPPORTED_FAMILIES, CdmoeVllmError, family_config  # noqa: E402

import cdmoe  # noqa: E402
from cdmoe.methods.calib_stats import calibration_stats  # noqa: E402
from cdmoe.methods.expert_reduce import merge_experts  # noqa: E402
from cdmoe.methods.layer_drop import drop_blocks  # noqa: E402
from cdmoe.methods.msmoe import msmoe_plans  # noqa: E402


def _config(model) -> dict:
    return model.config.to_dict()


def test_a_condensed_config_resolves_to_the_family_with_the_plugin_class():
    model = make_tiny("qwen2_moe")
    cdmoe.condense_layers(model, [cdmoe.LayerChoice(layer=1, experts=(0, 2), gates=(0.3, 0.2))])
    resolved = family_config(_config(model))
    assert resolved.model_type == "qwen2_moe" and resolved.architectures == ["CdmoeQwen2MoeForCausalLM"]
    assert resolved.cdmoe["condensed_layers"] == model.config.cdmoe["condensed_layers"]


def test_block_drop_renumbers_the_kept_layers():
    model = make_tiny("deepseek_v2")
    n = model.config.num_hidden_layers
    drop_blocks(model, [1])
    resolved = family_config(_config(model))
    assert resolved.num_hidden_layers == n - 1 and resolved.cdmoe["kept_layers"] == [i for i in range(n) if i != 1]


def test_msmoe_outputs_are_refused_in_one_line():
    """The id map behind the full router has no vLLM counterpart in the plugin: refused, not served wrong."""
    model = make_tiny("mixtral")
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    stats = calibration_stats(model, ids)
    merge_experts(model, msmoe_plans(model, stats, model.config.num_local_experts - 2))
    with pytest.raises(CdmoeVllmError, match="M-SMoE outputs") as refused:
        family_config(_config(model))
    assert "\n" not in str(refused.value) and all(f in str(refused.value) for f in SUPPORTED_FAMILIES)
