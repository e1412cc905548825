"""cdmoe compare: matched budgets, every point written and scored from disk."""

import json

import pytest
from conftest import DEMO_CALIB, DEMO_TEXT

from cdmoe.comparison.compare import compare, parse_methods
from cdmoe.errors import CdmoeError
from cdmoe.evaluation.measure import disk_bytes
from cdmoe.evaluation.perplexity import perplexity, token_stream
from cdmoe.models.loading import load_model, load_tokenizer
from cdmoe.search.calibration import CalibSpec


def test_parse_methods():
    names = [m.name for m in parse_methods("default")]
    assert "cd-moe" in names and "slim-int4" in names and "layer-drop+int4" in names
    by_name = {m.name: m for m in parse_methods("cd-moe-s,cd-moe:l1,cd-moe:layer-rank,cd-moe:kl,slim-int8,cd-moe+int4")}
    assert by_name["cd-moe-s"].search == {"experts": 0}
    assert by_name["cd-moe:l1"].search == {"expert_selector": "l1"}
    assert by_name["cd-moe:layer-rank"].search == {"layer_selector": "layer-rank"}
    assert by_name["cd-moe:kl"].search == {"metric": "kl"}
    assert by_name["slim-int8"].base == "slim" and by_name["slim-int8"].quantize == "int8"
    assert by_name["cd-moe+int4"].base == "cd-moe" and by_name["cd-moe+int4"].quantize == "int4"
    with pytest.raises(CdmoeError, match="unknown"):
        parse_methods("cd-moe:bogus")
    healed = {m.name: m for m in parse_methods("cd-moe+heal,cd-moe-s+heal")}
    assert healed["cd-moe+heal"].heal and healed["cd-moe+heal"].base == "cd-moe" and not healed["cd-moe+heal"].quantize
    assert healed["cd-moe-s+heal"].heal and healed["cd-moe-s+heal"].search == {"experts": 0}
    assert not by_name["cd-moe+int4"].heal
    for bad in ("layer-drop+heal", "cd-moe+heal+int4", "cd-moe+bogus"):
        with pytest.raises(CdmoeError, match="heal|suffix"):
            parse_methods(bad)


def test_compare_writes_matched_points(tiny_model_dir, tmp_path):
    out = tmp_path / "cmp"
    result = compare(tiny_model_dir, out, [0.8], parse_methods("cd-moe,layer-drop,expert-drop"),
                     CalibSpec(str(DEMO_CALIB), 4, 32, 0), eval_text=str(DEMO_TEXT), eval_tokens=2000,
                     progress=lambda msg: None)
    saved = json.loads((out / "compare.json").read_text())
    assert (out / "compare.md").exists() and (out / "compare.png").exists()
    rows = {r["method"]: r for r in saved["rows"]}
    assert set(rows) == {"original", "cd-moe", "layer-drop", "expert-drop"}
    original = disk_bytes(tiny_model_dir)
    for name in ("cd-moe", "layer-drop", "expert-drop"):
        row = rows[name]
        assert row["memory_ratio"] == pytest.approx(disk_bytes(out / row["dir"]) / original)
        assert row["budgets"] == [0.8]
        stream = token_stream(load_tokenizer(tiny_model_dir), str(DEMO_TEXT), 2000)  # scored from disk, as a user loads it
        assert row["ppl"] == pytest.approx(perplexity(load_model(out / row["dir"]), stream, 32), rel=1e-5)
        assert abs(row["predicted_ratio"] - row["memory_ratio"]) < 0.02  # the plan predicts the real bytes
    assert result["rows"][0]["memory_ratio"] == 1.0


def test_healed_points_keep_the_choices_and_change_only_the_condensed_mlps(tiny_model_dir, tmp_path):
    from fidelity_checks import tensors

    out = tmp_path / "cmp"
    compare(tiny_model_dir, out, [0.8], parse_methods("cd-moe,cd-moe+heal"), CalibSpec(str(DEMO_CALIB), 12, 32, 0),
            eval_text=str(DEMO_TEXT), eval_tokens=2000, progress=lambda msg: None)
    rows = {r["method"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    plain, healed = (json.loads((out / rows[m]["dir"] / "cdmoe.json").read_text()) for m in ("cd-moe", "cd-moe+heal"))
    assert healed["condensed"] == plain["condensed"] and "heal" in healed and "heal" not in plain
    assert healed["heal"]["calibration"]["samples"] == 12 and rows["cd-moe+heal"]["knob"] == rows["cd-moe"]["knob"]
    a, b = tensors(out / rows["cd-moe"]["dir"]), tensors(out / rows["cd-moe+heal"]["dir"])
    changed = {k for k in a if not (b[k].dtype == a[k].dtype and b[k].equal(a[k]))}
    layers = {f"model.layers.{c['layer']}.mlp." for c in plain["condensed"]}
    assert changed and all(any(k.startswith(p) for p in layers) for k in changed)
    assert rows["cd-moe+heal"]["ppl"] != rows["cd-moe"]["ppl"] and not (out / "heal-state").exists()


def test_compare_peak_rss_and_tasks_columns(tiny_model_dir, tmp_path):
    """--peak-rss measures every point in its own process; ratios are to the original's measurement."""
    out = tmp_path / "cmp"
    compare(tiny_model_dir, out, [0.8], parse_methods("layer-drop"), CalibSpec(str(DEMO_CALIB), 2, 32, 0),
            eval_text=str(DEMO_TEXT), eval_tokens=1000, measure_rss=True, progress=lambda msg: None)
    saved = json.loads((out / "compare.json").read_text())
    original, point = saved["rows"]
    assert saved["peak_rss_dtype"] == "auto"
    assert original["peak_rss_bytes"] > 0 and point["peak_rss_bytes"] > 0
    assert point["peak_rss_ratio"] == pytest.approx(point["peak_rss_bytes"] / original["peak_rss_bytes"])
    assert "| peak RSS |" in (out / "compare.md").read_text()


def test_compare_task_scores_equal_cdmoe_eval(tiny_model_dir, tmp_path):
    """compare's lm-eval columns are what `cdmoe eval --tasks demo` gives each saved directory."""
    from cdmoe.evaluation.lmeval import run_eval
    from cdmoe.search.calibration import read_documents

    text = tmp_path / "held_out.txt"  # 60 paragraphs: small tasks, so the test stays quick
    text.write_text("\n\n".join(read_documents(DEMO_TEXT)[:60]))
    out = tmp_path / "cmp"
    compare(tiny_model_dir, out, [0.8], parse_methods("layer-drop"), CalibSpec(str(DEMO_CALIB), 2, 32, 0),
            tasks="demo", task_text=str(text), progress=lambda msg: None)
    saved = json.loads((out / "compare.json").read_text())
    for row, path in zip(saved["rows"], (tiny_model_dir, out / saved["rows"][1]["dir"]), strict=True):
        direct = run_eval(path, "demo", str(text), batch_size="8", out=tmp_path / "eval.json", force=True)["summary"]
        assert row["tasks"].keys() == direct.keys()
        for task, value in direct.items():
            assert row["tasks"][task] == pytest.approx(value, rel=1e-4)
    assert "cdmoe_demo_cloze (%)" in (out / "compare.md").read_text()
