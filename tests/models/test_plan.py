"""``cdmoe plan``: parameter counts from configs, the paper's memory ratios, errors."""

import json

import pytest
from conftest import CONFIGS, make_tiny
from typer.testing import CliRunner

from cdmoe.cli import app
from cdmoe.models.budget import model_params
from cdmoe.models.plan import _analytic, plan
from cdmoe.models.testing import shrink_config

runner = CliRunner()
DSMOE = CONFIGS / "deepseek-ai__deepseek-moe-16b-base.json"
QWEN15 = CONFIGS / "Qwen__Qwen1.5-MoE-A2.7B.json"


def test_deepseekmoe_16b_total_matches_paper():
    result = plan(DSMOE, layers=9, experts=6)
    assert result["total_params"] == 16_375_728_128  # Table A.1
    assert result["active_params"] == 2_828_650_496  # Table A.1


@pytest.mark.parametrize(
    "config,layers,experts,paper",
    [(DSMOE, 9, 6, 0.725), (DSMOE, 8, 0, 0.731), (QWEN15, 6, 4, 0.797), (QWEN15, 6, 0, 0.783)],
)
def test_memory_ratios_match_paper(config, layers, experts, paper):
    assert plan(config, layers=layers, experts=experts)["memory_ratio"] == pytest.approx(paper, abs=0.003)


def test_qwen15_total_matches_paper():
    assert plan(QWEN15, layers=1)["total_params"] == 14_315_784_192  # Table A.1


def test_analytic_count_equals_meta_model_count():
    """The analytic counter (used for remote-code configs) agrees with the real class on a LLaMA-style family."""
    import json as _json

    data = _json.loads(QWEN15.read_text())
    data["model_type"] = "deepseek"  # route through the analytic path with qwen's sizes
    data.update(n_routed_experts=60, n_shared_experts=4, first_k_dense_replace=0, attention_bias=True)
    counted = _analytic(data)
    meta = plan(QWEN15, layers=1)
    # qwen adds a 1-wide shared-expert gate per layer, which the DeepSeek-style analytic count has not
    assert counted.total == meta["total_params"] - 24 * data["hidden_size"]


def test_plan_counts_equal_a_real_model(tmp_path):
    config = shrink_config(QWEN15)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = make_tiny("qwen2_moe")
    assert plan(tmp_path / "config.json", layers=2)["total_params"] == model_params(model).total


def test_cli_json_has_documented_keys():
    result = runner.invoke(app, ["plan", str(DSMOE), "--layers", "9", "--experts", "6", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"total_params", "condensed_params", "memory_ratio", "active_params"} <= set(data)
    assert data["condensed_params"] == round(data["memory_ratio"] * data["total_params"])


def test_cli_table_runs():
    result = runner.invoke(app, ["plan", str(QWEN15), "--layers", "6", "--shared-only"])
    assert result.exit_code == 0 and "78.2%" in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--layers", "40"], "out of range"),
        (["--experts", "65"], "64 routed experts"),
        (["--layer-ids", "0"], "not MoE layers"),
    ],
)
def test_cli_bad_input(args, message):
    result = runner.invoke(app, ["plan", str(DSMOE), *args])
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) <= 2


def test_cli_missing_path_and_dense_and_unknown(tmp_path):
    result = runner.invoke(app, ["plan", str(tmp_path / "nope.json")])
    assert result.exit_code == 2 and "does not exist" in result.output
    dense = tmp_path / "dense.json"
    dense.write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 64}))
    result = runner.invoke(app, ["plan", str(dense)])
    assert result.exit_code == 2 and "no sparse MoE layer" in result.output
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"model_type": "mystery_moe", "hidden_size": 32}))
    result = runner.invoke(app, ["plan", str(unknown)])
    assert result.exit_code == 2 and "unsupported model family" in result.output and "qwen2_moe" in result.output
