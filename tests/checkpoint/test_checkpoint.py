"""Saving a condensed model: smaller on disk, loads with and without cdmoe, same logits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from transformers import AutoModelForCausalLM

import cdmoe
from cdmoe.errors import CdmoeError
from cdmoe.models.adapter import moe_blocks
from cdmoe.models.budget import model_params


def _condensed(family, k=2, seed=0, **overrides):
    model = make_tiny(family, seed=seed, **overrides)
    blocks = moe_blocks(model)
    choices = [cdmoe.LayerChoice(layer=b.layer_idx, experts=tuple(range(k)), gates=(0.25,) * k) for b in blocks[-2:]]
    record = cdmoe.condense_layers(model, choices, base_model=f"tiny-{family}")
    return model, record


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _safetensors_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen2_moe", "mixtral", "deepseek_v3", "granitemoe"])
def test_save_load_roundtrip_with_cdmoe(tmp_path, family):
    model, record = _condensed(family)
    ids = torch.randint(0, 128, (2, 16))
    expected = _logits(model, ids)
    out = cdmoe.save(model, tmp_path / "out", record)
    loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")  # no trust_remote_code
    torch.testing.assert_close(_logits(loaded.eval(), ids), expected, atol=1e-5, rtol=1e-5)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_cdmoe.py", "cdmoe.json", "README.md",
            "generation_config.json"} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "cdmoe" and config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_cdmoe")


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2"])
def test_loads_where_cdmoe_is_not_installed(tmp_path, family):
    # start from a checkpoint on disk (per-expert key layout, converted on load), as a user does
    make_tiny(family).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager").eval()
    blocks = moe_blocks(model)
    record = cdmoe.condense_layers(
        model, [cdmoe.LayerChoice(layer=blocks[-1].layer_idx, experts=(0, 1), gates=(0.3, 0.2))], base_model="base")
    ids = torch.randint(0, 128, (2, 16))
    torch.save((ids, _logits(model, ids)), tmp_path / "expected.pt")
    out = cdmoe.save(model, tmp_path / "out", record)
    script = f"""
import sys
sys.modules["cdmoe"] = None  # any import of cdmoe fails, as where it is not installed
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, attn_implementation="eager").eval()
ids, expected = torch.load({str(tmp_path / 'expected.pt')!r})
with torch.no_grad():
    got = model(input_ids=ids).logits
torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
print("OK", type(model).__name__)
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK Condensed" in result.stdout


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen2_moe", "olmoe"])
def test_bytes_on_disk_shrink_as_predicted(tmp_path, family):
    original = make_tiny(family)
    original.save_pretrained(tmp_path / "orig")
    before = model_params(original)
    model, record = _condensed(family)
    out = cdmoe.save(model, tmp_path / "out", record)
    removed_params = before.total - record["params"]["condensed_params"]
    assert removed_params > 0
    shrink = _safetensors_bytes(tmp_path / "orig") - _safetensors_bytes(out)
    assert abs(shrink - 4 * removed_params) < 16_384  # fp32; the rest is safetensors' JSON header
    assert record["params"]["condensed_params"] == sum(p.numel() for p in model.parameters())


def test_native_format_when_the_family_can_express_it(tmp_path):
    # qwen3_moe marks arbitrary layers dense at intermediate_size: K * I = 3 * 32 = 96 fits exactly
    model, record = _condensed("qwen3_moe", k=3)
    assert record["native_format"] is True
    ids = torch.randint(0, 128, (1, 12))
    expected = _logits(model, ids)
    out = cdmoe.save(model, tmp_path / "out", record)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["mlp_only_layers"] == [2, 3]
    assert not (out / "modeling_cdmoe.py").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(loaded).__name__ == "Qwen3MoeForCausalLM"
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=1e-5, rtol=1e-5)


def test_existing_output_needs_force_and_force_replaces_only_cdmoe_outputs(tmp_path):
    model, record = _condensed("deepseek_v2")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    with pytest.raises(CdmoeError, match="already exists"):
        cdmoe.save(model, tmp_path / "mine", record)
    with pytest.raises(CdmoeError, match="replaces only directories cdmoe wrote"):
        cdmoe.save(model, tmp_path / "mine", record, force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "a user's file"
    cdmoe.save(model, tmp_path / "out", record)
    (tmp_path / "out" / "notes.txt").write_text("added by the user")  # not in cdmoe's manifest: never replaced
    with pytest.raises(CdmoeError, match="holds notes.txt, which cdmoe did not write"):
        cdmoe.save(model, tmp_path / "out", record, force=True)
    (tmp_path / "out" / "notes.txt").unlink()
    manifest = tmp_path / "out" / ".cdmoe-output.json"  # as a first run that wrote one more file would list it
    listed = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**listed, "files": [*listed["files"], "stale.txt"]}))
    (tmp_path / "out" / "stale.txt").write_text("from the first run")
    cdmoe.save(model, tmp_path / "out", record, force=True)
    assert (tmp_path / "out" / "config.json").exists() and not (tmp_path / "out" / "stale.txt").exists()


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model, record = _condensed("deepseek_v2")

    def broken_save(directory, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        cdmoe.save(model, tmp_path / "out", record)
    assert list(tmp_path.iterdir()) == []


def test_record_and_model_card(tmp_path):
    model, record = _condensed("deepseek_v2")
    out = cdmoe.save(model, tmp_path / "out", record)
    saved = json.loads((out / "cdmoe.json").read_text())
    assert [c["layer"] for c in saved["condensed"]] == [2, 3]
    assert saved["condensed"][0]["gates"] == [0.25, 0.25]
    assert set(saved["versions"]) == {"cdmoe", "torch", "transformers"}
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "| 2 | 0, 1 | 0.2500, 0.2500 |" in card
