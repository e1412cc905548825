"""Condensing a block-FP8 checkpoint: whole and sequential mode choose exactly what they choose on its bf16
cast; the output is FP8 again, untouched weights with the source's bytes and scales, the new condensed MLPs
block-quantised from the cast run's own bf16 tensors; it loads in plain transformers as the original does."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import DEMO_CALIB, DEMO_TEXT
from fidelity_checks import digest
from fp8_checks import fp8_checkpoints, tensors_of
from typer.testing import CliRunner

import cdmoe
from cdmoe.cli import app
from cdmoe.evaluation.perplexity import perplexity, token_stream
from cdmoe.methods.condense import EvalOptions, condense
from cdmoe.models.fp8_blocks import quantize
from cdmoe.models.loading import load_model, load_tokenizer
from cdmoe.search.calibration import CalibSpec
from cdmoe.search.run import SearchOptions

CALIB = CalibSpec(str(DEMO_CALIB), 4, 32, 0)
SAME = ("expert_search", "layer_order", "layer_step_scores", "single_layer_scores")  # bit-identical numbers


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def _run(source, out, experts, mode, evaluation=EvalOptions()):
    record = condense(source, out, SearchOptions(layers=2, experts=experts), CALIB, evaluation, show_progress=False,
                      mode=mode)
    return record, tensors_of(out), json.loads((out / "config.json").read_text())


EVAL = EvalOptions(text=str(DEMO_TEXT), max_tokens=600, baselines=False)


# deepseek_v3 (cdmoe format, blocks of 16 x 24: partial at every edge); qwen3_moe with K * I = intermediate_size,
# written in the family's own format (mlp_only_layers)
@pytest.mark.parametrize("family,experts,block", [("deepseek_v3", 2, (16, 24)), ("qwen3_moe", 3, (16, 24))])
def test_fp8_condenses_as_its_bf16_cast_and_stays_fp8(family, experts, block, tmp_path):
    fp8, cast = fp8_checkpoints(tmp_path, family, block)
    runs = {(name, mode): _run(src, tmp_path / f"{name}-{mode}", experts, mode, EVAL if mode == "whole" else EvalOptions())
            for name, src in (("fp8", fp8), ("cast", cast)) for mode in ("whole", "sequential")}
    reference, cast_tensors, cast_config = runs["cast", "whole"]
    for (name, mode), (record, tensors, config) in runs.items():
        assert record["condensed"] == reference["condensed"], (name, mode)  # experts, gates, token counts
        assert all(record["search"][k] == reference["search"][k] for k in SAME), (name, mode)
        assert record["native_format"] == (family == "qwen3_moe")
        assert ("quantization_config" in config) == (name == "fp8")
    assert "source_quantization" not in reference
    source = tensors_of(fp8)
    entry = json.loads((fp8 / "config.json").read_text())["quantization_config"]
    (_, whole, config), (record, sequential, _) = runs["fp8", "whole"], runs["fp8", "sequential"]
    assert config["quantization_config"] == entry and record["source_quantization"]["method"] == "fp8"
    assert {k: digest(t) for k, t in whole.items()} == {k: digest(t) for k, t in sequential.items()}
    applied = tensors_of(cdmoe.apply_record(fp8, tmp_path / "fp8-whole" / "cdmoe.json", tmp_path / "applied"))
    assert {k: digest(t) for k, t in applied.items()} == {k: digest(t) for k, t in whole.items()}  # cdmoe.save too
    condensed = {c["layer"] for c in reference["condensed"]}
    in_condensed = [f"model.layers.{i}.mlp." for i in condensed]
    # untouched: every source tensor outside the condensed MoE blocks, fp8 weights and scales, byte for byte
    untouched = {k: t for k, t in source.items() if not k.startswith(tuple(in_condensed))}
    assert any(t.dtype == torch.float8_e4m3fn for t in untouched.values())
    assert {k: digest(whole[k]) for k in untouched} == {k: digest(t) for k, t in untouched.items()}
    # new: the cast run's own bf16 condensed weights, block-quantised
    new = [k for k in whole if k.startswith(tuple(in_condensed)) and k.endswith("proj.weight")]
    assert len(new) == 3 * len(condensed)
    for key in new:
        q, s = quantize(cast_tensors[key], block)
        assert digest(whole[key]) == digest(q) and digest(whole[key + "_scale_inv"]) == digest(s), key
    assert set(whole) == set(untouched) | set(new) | {k + "_scale_inv" for k in new}
    fp8_bytes, cast_bytes = (sum(t.numel() * t.element_size() for t in ts.values()) for ts in (whole, cast_tensors))
    assert fp8_bytes < 0.7 * cast_bytes
    # what whole mode evaluated (the condensed MLPs rounded through their blocks) is what it saved
    evaluation = runs["fp8", "whole"][0]["evaluation"]
    stream = token_stream(load_tokenizer(fp8), evaluation["text"], EVAL.max_tokens)
    assert perplexity(load_model(tmp_path / "fp8-whole"), stream, evaluation["seq_len"]) == evaluation["condensed_ppl"]


def test_a_kept_fp8_entry_over_bf16_weights_is_dropped_from_the_output(tmp_path):
    fp8, cast = fp8_checkpoints(tmp_path, "deepseek_v3", (16, 24))
    entry = json.loads((fp8 / "config.json").read_text())["quantization_config"]
    config = json.loads((cast / "config.json").read_text())
    (cast / "config.json").write_text(json.dumps({**config, "quantization_config": entry}))  # as fp8_cast_bf16.py leaves it
    record, tensors, out_config = _run(cast, tmp_path / "out", 2, "sequential")
    assert "quantization_config" not in out_config
    assert record["source_quantization"]["dropped_quantization_config"] == entry
    assert not any(t.dtype == torch.float8_e4m3fn or k.endswith("_scale_inv") for k, t in tensors.items())
    (cast / "config.json").write_text(json.dumps(config))
    clean, clean_tensors, _ = _run(cast, tmp_path / "clean", 2, "whole")
    assert record["condensed"] == clean["condensed"]
    assert {k: digest(t) for k, t in tensors.items()} == {k: digest(t) for k, t in clean_tensors.items()}


def test_other_quantised_inputs_are_refused_in_one_line(tmp_path):
    fp8, _ = fp8_checkpoints(tmp_path, "deepseek_v3", (16, 24))
    config = json.loads((fp8 / "config.json").read_text())
    (fp8 / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "awq", "bits": 4}}))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["condense", str(fp8), "--out", str(out), "--layers", "1",
                                      "--calib", str(DEMO_CALIB), "--samples", "2", "--seq-len", "16"])
    assert result.exit_code == 2, result.output
    assert "quantised (awq)" in result.output and "dequantise it first" in result.output
    assert "Traceback" not in result.output and not out.exists()


@pytest.mark.slow
def test_fp8_output_loads_in_plain_transformers_as_the_original_does(tmp_path):
    """transformers' own FP8 integration (dequantised on CPU) reads the original and the condensed output;
    full blocks (8 x 8), since transformers 5.24 derives the block from the scale grid and misreads or
    refuses partial ones (it does so for the original too)."""
    fp8, _ = fp8_checkpoints(tmp_path, "deepseek_v3", (8, 8))
    out = tmp_path / "out"
    _run(fp8, out, 2, "sequential")
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    for name, path in (("original", fp8), ("condensed", out)):
        with torch.no_grad():
            torch.save((ids, cdmoe.load_model(path, dtype="bfloat16")(ids).logits), tmp_path / f"{name}.pt")
    script = f"""
import sys
sys.modules["cdmoe"] = None  # any import of cdmoe fails, as where it is not installed
import torch
from transformers import AutoModelForCausalLM
for name, path in (("original", {str(fp8)!r}), ("condensed", {str(out)!r})):
    model, info = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16,
                                                       output_loading_info=True)
    assert not any(info.values()), info
    ids, expected = torch.load({str(tmp_path)!r} + f"/{{name}}.pt")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected), name
    print("OK", type(model).__name__)
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK DeepseekV3ForCausalLM" in result.stdout and "OK CondensedDeepseekV3ForCausalLM" in result.stdout


def test_finetuned_fp8_weights_are_evaluated_as_saved(tmp_path):
    """Fine-tuning changes fp8 weights of an FP8 output (the condensed MLPs): they are written quantised again,
    and the perplexity fine-tuning reports is that of the saved directory."""
    from cdmoe.methods.finetune import FinetuneOptions, finetune

    fp8, _ = fp8_checkpoints(tmp_path, "deepseek_v3", (16, 24))
    condensed = tmp_path / "condensed"
    _run(fp8, condensed, 2, "sequential")
    out = tmp_path / "tuned"
    record = finetune(condensed, out, FinetuneOptions(data=str(DEMO_CALIB), steps=2, seq_len=32, batch_size=4, lr=1e-2),
                      EVAL, show_progress=False, log=lambda *_: None)
    before, after = tensors_of(condensed), tensors_of(out)
    changed = {k for k in before if digest(before[k]) != digest(after[k])}
    assert changed and all(k.startswith(("model.layers.2.mlp.", "model.layers.3.mlp.")) for k in changed)
    assert after["model.layers.2.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    evaluation = record["finetune"]["evaluation"]
    stream = token_stream(load_tokenizer(out), evaluation["text"], EVAL.max_tokens)
    assert perplexity(load_model(out), stream, evaluation["seq_len"]) == evaluation["ppl_after"]
