"""Measured memory: disk bytes are the weight files' sizes; peak RSS holds at least the loaded weights."""

import json

from conftest import make_tiny
from typer.testing import CliRunner

from cdmoe.cli import app
from cdmoe.evaluation.measure import disk_bytes, peak_rss


def test_disk_bytes_counts_weight_files_only(tiny_model_dir):
    weights = sum(f.stat().st_size for f in tiny_model_dir.glob("*.safetensors"))
    assert disk_bytes(tiny_model_dir) == weights
    assert weights < sum(f.stat().st_size for f in tiny_model_dir.iterdir())  # tokenizer and config not counted


def test_peak_rss_grows_with_the_model(tmp_path):
    """Two models that differ only in vocabulary: the forward reads the whole lm_head, so the measured
    peak must grow by at least the extra lm_head bytes (weights are mmapped, so untouched pages never count)."""
    rss = {}
    for vocab in (4_000, 40_000):
        make_tiny("deepseek_v2", seed=0, num_hidden_layers=2, vocab_size=vocab).save_pretrained(tmp_path / str(vocab))
        rss[vocab] = peak_rss(tmp_path / str(vocab), "float32")
    hidden = make_tiny("deepseek_v2").config.hidden_size
    extra_head = (40_000 - 4_000) * hidden * 4
    assert rss[40_000]["load_and_run_bytes"] - rss[4_000]["load_and_run_bytes"] >= extra_head
    for r in rss.values():
        assert r["load_and_run_bytes"] >= r["load_bytes"] >= 0


def test_measure_cli_ratios(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    result = CliRunner().invoke(app, ["measure", str(tiny_model_dir), str(copy), "--repeats", "1",
                                      "--out", str(tmp_path / "memory.json")])
    assert result.exit_code == 0, result.output
    assert not (copy / "memory.json").exists()  # nothing is written into an input
    saved = json.loads((tmp_path / "memory.json").read_text())
    for key, ratio in saved["ratios"].items():
        assert ratio == saved["condensed"][key] / saved["original"][key]
    assert saved["ratios"]["disk_bytes"] == 1.0
