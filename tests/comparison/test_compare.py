"""cdmoe compare: a budget is a ceiling (each method's largest setting that fits), every point written and
scored from disk, the measured memory beside each score."""

import json

import pytest
from conftest import DEMO_CALIB, DEMO_TEXT

from cdmoe.comparison.budgets import largest_fitting
from cdmoe.comparison.compare import compare, markdown_table, parse_methods
from cdmoe.errors import CdmoeError
from cdmoe.evaluation.measure import disk_bytes
from cdmoe.evaluation.perplexity import perplexity, token_stream
from cdmoe.methods.budget_plan import plan_summary
from cdmoe.models.budget import model_params
from cdmoe.models.loading import load_model, load_tokenizer
from cdmoe.models.mixed import LayerAction
from cdmoe.models.plan import plan
from cdmoe.search.calibration import CalibSpec


def test_parse_methods():
    names = [m.name for m in parse_methods("default")]
    assert "cd-moe" in names and "slim-int4" in names and "layer-drop+int4" in names and "reap" in names
    by_name = {m.name: m for m in parse_methods("cd-moe-s,cd-moe:l1,cd-moe:layer-rank,cd-moe:kl,slim-int8,cd-moe+int4")}
    assert by_name["cd-moe-s"].search == {"experts": 0}
    assert by_name["cd-moe:l1"].search == {"expert_selector": "l1"}
    assert by_name["cd-moe:layer-rank"].search == {"layer_selector": "layer-rank"}
    assert by_name["cd-moe:kl"].search == {"metric": "kl"}
    assert by_name["slim-int8"].base == "slim" and by_name["slim-int8"].quantize == "int8"
    assert by_name["cd-moe+int4"].base == "cd-moe" and by_name["cd-moe+int4"].quantize == "int4"
    reap = parse_methods("reap+int4")[0]
    assert (reap.base, reap.knob, reap.quantize) == ("reap", "keep_experts", "int4")
    with pytest.raises(CdmoeError, match="unknown"):
        parse_methods("cd-moe:bogus")
    healed = {m.name: m for m in parse_methods("cd-moe+heal,cd-moe-s+heal")}
    assert healed["cd-moe+heal"].heal and healed["cd-moe+heal"].base == "cd-moe" and not healed["cd-moe+heal"].quantize
    assert healed["cd-moe-s+heal"].heal and healed["cd-moe-s+heal"].search == {"experts": 0}
    assert not by_name["cd-moe+int4"].heal
    assert parse_methods("budget+heal")[0].heal and parse_methods("budget+heal")[0].base == "budget"
    for bad in ("layer-drop+heal", "cd-moe+heal+int4", "cd-moe+bogus"):
        with pytest.raises(CdmoeError, match="heal|suffix"):
            parse_methods(bad)
    ct = {m.name: m for m in parse_methods("cd-moe+w8a8,slim-w4a16,layer-drop+fp8")}
    assert [(m.base, m.quantize) for m in ct.values()] == [("cd-moe", "w8a8"), ("slim", "w4a16"), ("layer-drop", "fp8")]
    with pytest.raises(CdmoeError, match=r"unknown suffix 'w2a2' .* use \+w8a8, \+w4a16, \+fp8, \+int8, \+int4"):
        parse_methods("cd-moe+w2a2")


def test_largest_fitting_is_a_ceiling():
    ratios = {1: 0.90, 2: 0.81, 3: 0.70, 4: 0.60}
    assert largest_fitting(ratios, 0.8) == 3  # the closest, 2 (81%), would exceed the budget
    assert largest_fitting(ratios, 0.70) == 3  # equal fits
    assert largest_fitting(ratios, 0.55) is None
    assert largest_fitting({5: 0.7, 6: 0.7, 7: 0.8}, 0.75) == 5  # ties: the lower setting


def test_compare_writes_the_largest_point_under_each_budget(tiny_model_dir, tmp_path):
    out = tmp_path / "cmp"
    budget = 0.8  # Layer Drop's closest setting, N=1, is 82.4% of the bytes: over it
    result = compare(tiny_model_dir, out, [budget], parse_methods("cd-moe,layer-drop,expert-drop,reap"),
                     CalibSpec(str(DEMO_CALIB), 4, 32, 0), eval_text=str(DEMO_TEXT), eval_tokens=2000,
                     progress=lambda msg: None)
    saved = json.loads((out / "compare.json").read_text())
    assert (out / "compare.md").exists() and (out / "compare.png").exists()
    rows = {r["method"]: r for r in saved["rows"]}
    assert set(rows) == {"original", "cd-moe", "layer-drop", "expert-drop", "reap"}
    params = model_params(load_model(tiny_model_dir))
    moe = params.moe_layer_ids
    ratio = {  # predicted ratio of a setting, from the parameter counts
        "cd-moe": lambda n: plan(tiny_model_dir, layers=n)["memory_ratio"],
        "layer-drop": lambda n: params.layer_dropped_total(moe[:n]) / params.total,
        "expert-drop": lambda e: params.experts_reduced_total(e) / params.total,
    }
    ratio["reap"] = ratio["expert-drop"]
    original = disk_bytes(tiny_model_dir)
    table = (out / "compare.md").read_text()
    for name in ("cd-moe", "layer-drop", "expert-drop", "reap"):
        row = rows[name]
        assert row["predicted_ratio"] == pytest.approx(ratio[name](row["knob"]), abs=1e-12)
        assert row["predicted_ratio"] <= budget
        step = 1 if name in ("cd-moe", "layer-drop") else -1  # the next larger setting no longer fits
        assert ratio[name](row["knob"] - step) > budget
        assert row["memory_ratio"] == pytest.approx(disk_bytes(out / row["dir"]) / original)
        assert row["over_budgets"] == ([budget] if row["memory_ratio"] > budget else [])
        assert f"| {100 * row['memory_ratio']:.1f}%{' **over**' if row['over_budgets'] else ''} |" in table
        assert row["budgets"] == [budget]
        stream = token_stream(load_tokenizer(tiny_model_dir), str(DEMO_TEXT), 2000)  # scored from disk, as a user loads it
        assert row["ppl"] == pytest.approx(perplexity(load_model(out / row["dir"]), stream, 32), rel=1e-5)
        assert abs(row["predicted_ratio"] - row["memory_ratio"]) < 0.02  # the plan predicts the real bytes
    assert result["rows"][0]["memory_ratio"] == 1.0 and saved["unfit"] == []
    assert rows["layer-drop"]["knob"] == 2 and rows["reap"]["knob"] == rows["expert-drop"]["knob"]


def test_table_marks_points_over_budget_and_methods_that_do_not_fit():
    row = {"knob": None, "budgets": [0.5], "active_params": 1e6, "speedup": 1.0, "ppl": 10.0}
    result = {"model": "m", "budgets": [0.5], "rows": [
        {**row, "method": "original", "budgets": [], "memory_ratio": 1.0},
        {**row, "method": "a", "knob": 3, "knob_name": "layers", "memory_ratio": 0.49, "over_budgets": []},
        {**row, "method": "b", "knob": 4, "knob_name": "keep_experts", "memory_ratio": 0.503, "over_budgets": [0.5]}],
        "unfit": [{"method": "slim-int8", "budget": 0.5, "smallest_predicted_ratio": 0.696}]}
    lines = markdown_table(result).splitlines()
    assert "| a | N=3 | 1.00M | 49.0% | 1.00x | 10.00 |" in lines
    assert "| b | E'=4 | 1.00M | 50.3% **over** | 1.00x | 10.00 |" in lines
    assert "| slim-int8 | none fits | - | smallest setting: 69.6% (predicted) | - | - |" in lines


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


def test_compare_budget_method_is_planned_for_each_budget_and_stays_under_it(tiny_model_dir, tmp_path):
    out = tmp_path / "cmp"
    budgets = [0.8, 0.6]
    compare(tiny_model_dir, out, budgets, parse_methods("budget"), CalibSpec(str(DEMO_CALIB), 4, 32, 0),
            eval_text=str(DEMO_TEXT), eval_tokens=2000, progress=lambda msg: None)
    saved = json.loads((out / "compare.json").read_text())
    rows = [r for r in saved["rows"] if r["method"] == "budget"]
    assert sorted(r["budgets"][0] for r in rows) == sorted(budgets) and parse_methods("budget")[0].knob == "budget"
    stream = token_stream(load_tokenizer(tiny_model_dir), str(DEMO_TEXT), 2000)
    table = (out / "compare.md").read_text()
    for row in rows:
        record = json.loads((out / row["dir"] / "cdmoe.json").read_text())
        budget = row["budgets"][0]
        assert record["method"] == "budget" and record["budget"]["ratio"] == budget
        assert row["memory_ratio"] <= row["predicted_ratio"] <= budget and not row["over_budgets"]  # a ceiling
        assert row["memory_ratio"] == pytest.approx(disk_bytes(out / row["dir"]) / disk_bytes(tiny_model_dir))
        assert row["ppl"] == pytest.approx(perplexity(load_model(out / row["dir"]), stream, 32), rel=1e-5)
        assert f"| budget | {row['setting']} |" in table
        assert row["setting"] == plan_summary({int(k): LayerAction.from_dict(v) for k, v in record["layers"].items()})
    small, large = sorted(rows, key=lambda r: r["budgets"][0])
    assert small["memory_ratio"] < large["memory_ratio"]
    with pytest.raises(CdmoeError, match="unknown"):
        parse_methods("budget:kl")


def test_compare_without_eval_text_or_tasks_scores_what_it_measured(tiny_model_dir, tmp_path):
    """As the README's synopsis writes it (no --eval-text, no --tasks): every point was built, then the plot
    crashed ("Number of columns must be a positive integer, not 0") and nothing was written. Now the table
    has the measured memory and speed-up, the plot the speed-up against memory."""
    from typer.testing import CliRunner

    from cdmoe.cli import app

    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", str(tiny_model_dir), "--out", str(out), "--budget", "0.9",
                                      "--methods", "layer-drop", "--calib", str(DEMO_CALIB), "--samples", "2",
                                      "--seq-len", "16"])
    assert result.exit_code == 0, result.output
    original, point = json.loads((out / "compare.json").read_text())["rows"]
    assert point["method"] == "layer-drop" and "ppl" not in point and "tasks" not in point
    assert point["memory_ratio"] == pytest.approx(disk_bytes(out / point["dir"]) / disk_bytes(tiny_model_dir))
    assert point["speedup"] > 0 and original["speedup"] == 1.0
    assert f"| layer-drop | N={point['knob']} |" in (out / "compare.md").read_text()
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("job", ["compare", "sweep"])
def test_unreadable_calibration_is_refused_before_the_weights_load(tiny_model_dir, tmp_path, monkeypatch, job):
    import cdmoe.comparison.compare as compare_module
    import cdmoe.comparison.sweep as sweep_module
    from cdmoe.search.run import SearchOptions

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = compare_module if job == "compare" else sweep_module
    monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    calib = CalibSpec("no-such-org/no-such-dataset", 4, 32, 0)
    with pytest.raises(CdmoeError, match="cannot read calibration dataset"):
        if job == "compare":
            compare(tiny_model_dir, tmp_path / "out", [0.8], parse_methods("expert-drop"), calib)
        else:
            sweep_module.sweep(tiny_model_dir, tmp_path / "out", [1], SearchOptions(layers=1), calib)
    assert not (tmp_path / "out").exists()


def test_budget_and_budget_heal_share_one_planner_run(tiny_model_dir, tmp_path, monkeypatch):
    import cdmoe.comparison.compare as compare_module

    runs = []
    real = compare_module.plan_budgets
    monkeypatch.setattr(compare_module, "plan_budgets", lambda *a, **k: runs.append(1) or real(*a, **k))
    out = tmp_path / "cmp"
    compare(tiny_model_dir, out, [0.7], parse_methods("budget,budget+heal"), CalibSpec(str(DEMO_CALIB), 4, 32, 0),
            progress=lambda msg: None)
    rows = {r["method"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    plain, healed = (json.loads((out / rows[m]["dir"] / "cdmoe.json").read_text()) for m in ("budget", "budget+heal"))
    assert len(runs) == 1 and plain["layers"] == healed["layers"]
    assert rows["budget"]["setting"] == rows["budget+heal"]["setting"]
    assert ("heal" in healed) == bool(healed.get("condensed")) and "heal" not in plain


def test_budget_w8a8_is_planned_in_its_own_bytes(tiny_model_dir, tmp_path):
    """compare's budget+w8a8: its own planner run, priced in the quantised bytes: at the same budget it keeps
    more than the unquantised plan, and its measured bytes are what the planner predicted, within the budget."""
    pytest.importorskip("compressed_tensors")
    out = tmp_path / "cmp"
    compare(tiny_model_dir, out, [0.6], parse_methods("budget,budget+w8a8"), CalibSpec(str(DEMO_CALIB), 4, 32, 0),
            progress=lambda msg: None)
    rows = {r["method"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    plain, quant = (json.loads((out / rows[m]["dir"] / "cdmoe.json").read_text()) for m in ("budget", "budget+w8a8"))
    assert quant["quantization"]["scheme"] == "w8a8" and "quantization" not in plain
    assert len(quant["steps"]) < len(plain["steps"])  # the quantised plan needs fewer structural steps
    written = sum(f.stat().st_size for f in (out / rows["budget+w8a8"]["dir"]).glob("*.safetensors"))
    assert written <= quant["budget"]["predicted_bytes"] <= quant["budget"]["budget_bytes"]
    assert rows["budget+w8a8"]["memory_ratio"] <= 0.6
    with pytest.raises(CdmoeError, match="budget\\+w8a8, budget\\+w4a16 or budget\\+fp8"):
        parse_methods("budget+int4")
