"""Code shipped inside a checkpoint runs only with --trust-remote-code (trust_remote_code=True).

Each checkpoint here carries a planted Python file named by its ``auto_map`` that appends a
line to a marker file when it is imported: the marker tells whether any load ran it.
"""

import json
import shutil

import pytest
import torch
from conftest import DEMO_CALIB, DEMO_TEXT, remote_code_checkpoint
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import cdmoe
from cdmoe.cli import app

runner = CliRunner()
CALIB = ["--calib", str(DEMO_CALIB), "--samples", "4", "--seq-len", "16", "--quiet"]

PLANTED = '''
import os
with open(os.environ["CDMOE_MARKER"], "a") as f:
    f.write("ran\\n")
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, PreTrainedTokenizerFast
class MarkerConfig(DeepseekV2Config):
    pass
class MarkerForCausalLM(DeepseekV2ForCausalLM):
    config_class = MarkerConfig
class MarkerTokenizer(PreTrainedTokenizerFast):
    pass
'''


@pytest.fixture
def marker(tmp_path, monkeypatch):
    path = tmp_path / "marker.txt"
    monkeypatch.setenv("CDMOE_MARKER", str(path))
    return path


@pytest.fixture
def planted_dir(tiny_model_dir, tmp_path):
    """A native deepseek_v2 checkpoint whose config and tokenizer also name planted code, as
    DeepSeek-V2-Lite's config names its own modelling files."""
    path = tmp_path / f"planted_{tmp_path.name}"  # a module name of its own: imported afresh in each test
    shutil.copytree(tiny_model_dir, path)
    (path / "marker_code.py").write_text(PLANTED)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "marker_code.MarkerConfig", "AutoModelForCausalLM": "marker_code.MarkerForCausalLM"}
    (path / "config.json").write_text(json.dumps(config))
    tok = json.loads((path / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": [None, "marker_code.MarkerTokenizer"]}
    (path / "tokenizer_config.json").write_text(json.dumps(tok))
    return path


@pytest.mark.parametrize("mode", ["whole", "sequential"])
def test_condense_uses_transformers_class_unless_trusted(planted_dir, tmp_path, marker, mode):
    out = tmp_path / "out"
    result = runner.invoke(app, ["condense", str(planted_dir), "--out", str(out), "--layers", "1", "--mode", mode,
                                 *CALIB])
    assert result.exit_code == 0, result.output
    assert not marker.exists()
    assert not (out / "marker_code.py").exists()  # foreign code is not copied into an output
    trusted = runner.invoke(app, ["condense", str(planted_dir), "--out", str(tmp_path / "t"), "--layers", "1",
                                  "--mode", mode, "--trust-remote-code", *CALIB])
    assert trusted.exit_code == 0, trusted.output
    assert marker.exists()  # the flag reaches the loads


def test_plan_eval_measure_and_apply_run_no_checkpoint_code(planted_dir, tmp_path, marker, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(app, ["plan", str(planted_dir), "--layers", "1"]).exit_code == 0
    condensed = tmp_path / "c"
    assert runner.invoke(app, ["condense", str(planted_dir), "--out", str(condensed), "--layers", "1", *CALIB]).exit_code == 0
    result = runner.invoke(app, ["eval", str(planted_dir), "--tasks", "none", "--ppl-text", str(DEMO_TEXT),
                                 "--ppl-tokens", "300", "--ppl-seq-len", "64"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["measure", str(planted_dir), str(condensed), "--repeats", "1"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["apply", str(planted_dir), str(condensed), "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert not marker.exists()


@pytest.fixture(scope="module")
def remote_dir(tmp_path_factory):
    """A checkpoint that only its own code can load (model_type "deepseek", DeepSeekMoE-16B's layout)."""
    return remote_code_checkpoint(tmp_path_factory.mktemp("remote") / "base")


def test_code_only_checkpoint_is_refused_with_the_flag_named(remote_dir, tmp_path):
    with pytest.raises(cdmoe.CdmoeError, match="--trust-remote-code"):
        cdmoe.load_model(remote_dir)
    assert cdmoe.load_model(remote_dir, trust_remote_code=True).config.model_type == "deepseek"


def test_condensed_remote_family_runs_its_shipped_code_only_when_trusted(remote_dir, tmp_path, marker):
    model = cdmoe.load_model(remote_dir, trust_remote_code=True)
    record = cdmoe.condense_layers(model, [cdmoe.LayerChoice(layer=2, experts=(0, 1), gates=(0.3, 0.2))])
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    out = cdmoe.save(model, tmp_path / "out", record, source=remote_dir)
    with open(out / "modeling_deepseek.py", "a") as f:  # plant the marker in the shipped family code
        f.write('\nimport os\nopen(os.environ["CDMOE_MARKER"], "a").write("ran\\n")\n')
    # cdmoe is imported (its classes are registered): still no code from the directory without trust
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(out)
    assert not marker.exists()
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert marker.exists()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
