"""``cdmoe eval --backend vllm``: lm-eval's vLLM model in the vLLM venv scores what transformers scores.

The condensed demo model (N = 4, K = 4) on the local demo tasks, once with ``--backend hf``
(transformers in this process) and once with ``--backend vllm`` (the plugin in the vLLM venv),
fp32: the cloze accuracies are equal (the same argmax over four log-likelihood sums) and the
perplexity task's metrics agree to ``RTOL`` (vLLM's fp32 logprobs differ from transformers' by
~1e-5 per token, see test_vllm.py; summed over a document that stays well under 1e-5 relative).
The refusals need no vLLM.
"""

from __future__ import annotations

import json

import pytest
from test_vllm import DEMO, ROOT, VLLM_PYTHON, _condensed, _demo
from typer.testing import CliRunner

from cdmoe.cli import app

RTOL = 1e-5
TASK_ARGS = ["--tasks", "demo", "--task-text", str(ROOT / "demo" / "data" / "test.txt.gz"), "--limit", "24",
             "--dtype", "float32"]
runner = CliRunner()


def _refused(result, message):
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_missing_vllm_venv_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("CDMOE_VLLM_PYTHON", raising=False)
    monkeypatch.chdir(tmp_path)  # no .venv-vllm here
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", str(DEMO), *TASK_ARGS, "--backend", "vllm", "--out", str(out)])
    _refused(result, "scripts/setup_vllm.sh")
    result = runner.invoke(app, ["eval", str(DEMO), *TASK_ARGS, "--backend", "vllm", "--vllm-python",
                                 str(tmp_path / "nope" / "python"), "--out", str(out)])
    _refused(result, "--vllm-python")
    assert not out.exists()


@pytest.mark.parametrize("extra,message", [(["--ppl-text", str(ROOT / "demo" / "data" / "test.txt.gz")], "--ppl-text"),
                                           (["--backend", "tensorrt"], "--backend takes hf or vllm")])
def test_backend_refusals(tmp_path, extra, message):
    args = ["eval", str(DEMO), *TASK_ARGS, "--out", str(tmp_path / "e.json"), *extra]
    if "--ppl-text" in extra:
        args += ["--backend", "vllm"]
    _refused(runner.invoke(app, args), message)
    assert not (tmp_path / "e.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"no vLLM venv at {VLLM_PYTHON} (scripts/setup_vllm.sh)")
def test_vllm_backend_scores_equal_transformers(tmp_path, monkeypatch):
    model = _condensed(_demo(), [1, 3, 4, 7], [1, 0, 3, 6], tmp_path / "demo-n4-k4")
    for tokenizer_file in DEMO.glob("tokenizer*"):  # as cdmoe condense writes them
        (model / tokenizer_file.name).write_bytes(tokenizer_file.read_bytes())
    monkeypatch.setenv("VLLM_MLA_DISABLE", "1")  # vLLM-CPU's MLA refuses the demo's head size (see test_vllm)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    scores = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / f"{backend}.json"
        result = runner.invoke(app, ["eval", str(model), *TASK_ARGS, "--backend", backend, "--vllm-python",
                                     str(VLLM_PYTHON), "--out", str(out)])
        assert result.exit_code == 0, result.output
        scores[backend] = json.loads(out.read_text())["results"]
    hf, vllm = scores["hf"], scores["vllm"]
    assert sorted(hf) == sorted(vllm) == ["cdmoe_demo_cloze", "cdmoe_demo_ppl"]
    for metric in ("acc,none", "acc_norm,none"):
        assert vllm["cdmoe_demo_cloze"][metric] == hf["cdmoe_demo_cloze"][metric]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert vllm["cdmoe_demo_ppl"][metric] == pytest.approx(hf["cdmoe_demo_ppl"][metric], rel=RTOL)
