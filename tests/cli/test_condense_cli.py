"""``cdmoe condense`` / ``sweep`` / ``report`` end to end on a tiny checkpoint with a tokenizer."""

import json

import pytest
import torch
from conftest import DEMO_CALIB, DEMO_TEXT
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from cdmoe.checkpoint.record import choices_from_record, condense_layers
from cdmoe.cli import app
from cdmoe.models.adapter import moe_blocks
from cdmoe.models.loading import load_model, load_tokenizer
from cdmoe.search.calibration import CalibSpec, load_calibration
from cdmoe.search.run import SearchOptions, run_search

runner = CliRunner()
CALIB = ["--calib", str(DEMO_CALIB), "--samples", "6", "--seq-len", "32", "--quiet"]


def test_condense_cli_writes_a_loadable_directory(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["condense", str(tiny_model_dir), "--out", str(out), "--layers", "2", *CALIB,
                                 "--eval-text", str(DEMO_TEXT), "--eval-tokens", "2000"])
    assert result.exit_code == 0, result.output
    assert "same layers dropped" in result.stdout and "layers chosen" in result.stdout
    record = json.loads((out / "cdmoe.json").read_text())
    assert len(record["condensed"]) == 2 and record["search"]["calibration"]["samples"] == 6
    ev = record["evaluation"]
    assert {"original_ppl", "condensed_ppl", "random_experts_ppl", "dropped_layers_ppl"} <= set(ev)
    assert (out / "plots" / "single_layer_js.png").stat().st_size > 1000
    # the saved model is the original with the recorded choices condensed in (Eq. 3), nothing else
    model = AutoModelForCausalLM.from_pretrained(out)
    expected = load_model(tiny_model_dir)
    condense_layers(expected, choices_from_record(record))
    ids = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    # the existing output directory is refused without --force
    again = runner.invoke(app, ["condense", str(tiny_model_dir), "--out", str(out), "--layers", "1", *CALIB])
    assert again.exit_code == 2 and "already exists" in again.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--layers", "9"], "out of range"),
        (["--layers", "1", "--experts", "20"], "routed experts"),
        (["--layers", "1", "--calib", "missing.txt"], "does not exist"),
        (["--layers", "1", "--expert-selector", "best"], "unknown --expert-selector"),
    ],
)
def test_condense_cli_bad_input(tiny_model_dir, tmp_path, args, message):
    base = ["condense", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--samples", "4", "--seq-len", "16",
            "--quiet"]
    if "--calib" not in args:
        base += ["--calib", str(DEMO_CALIB)]
    result = runner.invoke(app, base + args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_empty_calibration_file_and_missing_model(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    result = runner.invoke(app, ["condense", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--layers", "1",
                                 "--calib", str(empty), "--seq-len", "16", "--quiet"])
    assert result.exit_code == 2 and "is empty" in result.output
    result = runner.invoke(app, ["condense", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--layers", "1"])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_short_calibration_text_warns_with_the_count(tiny_model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A short text about the Python interpreter and its modules.\n\n" * 5)
    with pytest.warns(UserWarning, match="only .* tokens"):
        ids = load_calibration(load_tokenizer(tiny_model_dir), CalibSpec(str(short), samples=50, seq_len=16))
    assert ids.shape[1] == 16 and ids.shape[0] < 50


def test_condense_cli_with_ablation_selectors(tiny_model_dir, tmp_path):
    out = tmp_path / "abl"
    result = runner.invoke(app, ["condense", str(tiny_model_dir), "--out", str(out), "--layers", "2", *CALIB,
                                 "--expert-selector", "l1", "--layer-selector", "layer-rank"])
    assert result.exit_code == 0, result.output
    search = json.loads((out / "cdmoe.json").read_text())["search"]
    assert search["expert_selector"] == "l1" and search["layer_selector"] == "layer-rank"
    # Layer Rank: the 2 layers whose own output moved least; L1: each layer's lowest-L1-norm experts (the
    # paper's baseline), from the fused expert tensors of the original directly
    own = {int(layer): found["step_scores"][-1] for layer, found in search["expert_search"].items()}
    assert search["layer_order"] == sorted(own, key=lambda i: (own[i], i))[:2]
    original = load_model(tiny_model_dir)
    for block in moe_blocks(original):
        experts = block.module.experts
        norms = experts.gate_up_proj.abs().sum((1, 2)) + experts.down_proj.abs().sum((1, 2))
        k = len(search["expert_search"][str(block.layer_idx)]["experts"])
        assert sorted(search["expert_search"][str(block.layer_idx)]["experts"]) == sorted(norms.argsort()[:k].tolist())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sorted(model.config.cdmoe["condensed_layers"]) == sorted(str(i) for i in search["layer_order"])


def test_sweep_order_for_n_is_a_prefix_of_the_order_for_n_plus_one(tiny_model_dir):
    model = load_model(tiny_model_dir)
    ids = load_calibration(load_tokenizer(tiny_model_dir), CalibSpec(str(DEMO_CALIB), samples=6, seq_len=32))
    two = run_search(model, ids, SearchOptions(layers=2))
    three = run_search(model, ids, SearchOptions(layers=3))
    assert [c.layer for c in three.choices][:2] == [c.layer for c in two.choices]


def test_sweep_cli_writes_points_and_report(tiny_model_dir, tmp_path):
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["sweep", str(tiny_model_dir), "--out", str(out), "--layers", "1,3",
                                 "--calib", str(DEMO_CALIB), "--samples", "6", "--seq-len", "32",
                                 "--eval-text", str(DEMO_TEXT), "--eval-tokens", "1500"])
    assert result.exit_code == 0, result.output
    one = json.loads((out / "layers-1" / "cdmoe.json").read_text())
    three = json.loads((out / "layers-3" / "cdmoe.json").read_text())
    assert three["search"]["layer_order"][:1] == one["search"]["layer_order"]
    report = json.loads((out / "report" / "report.json").read_text())
    assert [len(r["layers"]) for r in report["rows"]] == [1, 3]
    for name in report["plots"].values():
        assert (out / "report" / name).stat().st_size > 1000
