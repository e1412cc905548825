"""A remote-code MoE with one module per expert (DeepSeekMoE-16B's layout): handled structurally."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import remote_code_checkpoint
from transformers import AutoModelForCausalLM

import cdmoe
import cdmoe.models.adapter as adapter
from cdmoe.models.adapter import family_spec, moe_blocks
from cdmoe.search.run import SearchOptions, run_search


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return remote_code_checkpoint(tmp_path_factory.mktemp("remote") / "base")


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, attn_implementation="eager").eval()


@pytest.mark.parametrize("probed", [False, True])
def test_routing_matches_the_remote_gate(base_dir, monkeypatch, probed):
    model = _load(base_dir)
    if probed:  # as if "deepseek" were not in cdmoe's table: the structure alone must do
        monkeypatch.setattr(adapter, "spec_for_model_type", lambda model_type: None)
    spec = family_spec(model)
    assert spec.notes.startswith("probed") == probed
    blocks = moe_blocks(model, spec)
    assert [b.layer_idx for b in blocks] == [1, 2, 3] and not blocks[0].fused
    x = torch.randn(40, model.config.hidden_size)
    for block in blocks:
        idx, weight, _ = block.router(x)
        ours = block.route(x)
        idx, order = idx.sort(-1)
        our_idx, our_order = ours.indices.sort(-1)
        assert torch.equal(idx, our_idx)
        torch.testing.assert_close(ours.gates.gather(1, our_order), weight.gather(1, order))
        expected = block.shared_output(x) + sum(
            ours.gates[:, k, None] * torch.stack([block.expert_output(int(e), x[t:t + 1])[0]
                                                  for t, e in enumerate(ours.indices[:, k])])
            for k in range(ours.indices.shape[1])
        )
        with torch.no_grad():
            torch.testing.assert_close(block.module(x), expected, atol=2e-5, rtol=1e-4)


def test_condensed_remote_model_loads_without_cdmoe(base_dir, tmp_path):
    model = _load(base_dir)
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    result = run_search(model, ids, SearchOptions(layers=2, experts=2))
    record = cdmoe.condense_layers(model, result.choices, base_model=str(base_dir))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    out = cdmoe.save(model, tmp_path / "out", record)
    assert {"modeling_deepseek.py", "configuration_deepseek.py", "modeling_cdmoe.py"} <= set(os.listdir(out))
    torch.save((ids, expected), tmp_path / "expected.pt")
    script = f"""
import sys
sys.modules["cdmoe"] = None
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, attn_implementation="eager").eval()
ids, expected = torch.load({str(tmp_path / 'expected.pt')!r})
with torch.no_grad():
    torch.testing.assert_close(m(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
print("OK")
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-2000:]
    reloaded = _load(out)  # and in this process, with cdmoe registered
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
