"""Condense (or drop) then quantise: one loadable directory, bytes as predicted, logits close."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import DEMO_CALIB, make_tiny
from safetensors import safe_open

from cdmoe.methods.baselines import BaselineOptions, run_baseline
from cdmoe.methods.condense import EvalOptions, condense
from cdmoe.methods.quantize import quantize_model, unfuse_experts
from cdmoe.models.loading import load_model
from cdmoe.search.calibration import CalibSpec
from cdmoe.search.run import SearchOptions

pytest.importorskip("bitsandbytes")
CALIB = CalibSpec(str(DEMO_CALIB), 4, 32, 0)
# relative L2 error of the logits that each bit width must stay under on the tiny random models
TOLERANCE = {"int8": 0.06, "int4": 0.2}


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def payload_bytes(directory):
    total = 0
    for path in directory.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("name", ["deepseek_v2", "qwen2_moe", "mixtral"])
def test_unfused_experts_are_the_same_experts(name):
    model = make_tiny(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        unfused = unfuse_experts(model)
        torch.testing.assert_close(unfused(input_ids=ids).logits, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_condense_then_quantise(tiny_model_dir, tmp_path, bits):
    plain_out, q_out = tmp_path / "plain", tmp_path / bits
    search = SearchOptions(layers=2, experts=2)
    condense(tiny_model_dir, plain_out, search, CALIB, EvalOptions(), show_progress=False)
    record = condense(tiny_model_dir, q_out, search, CALIB, EvalOptions(), show_progress=False, quantize=bits)
    saved = json.loads((q_out / "cdmoe.json").read_text())
    assert saved["quantization"]["bits"] == bits and saved["condensed"] == record["condensed"]
    # bytes on disk: the prediction for the bit width (payload, i.e. without safetensors headers)
    predicted = saved["quantization"]["predicted_payload_bytes"]
    assert abs(payload_bytes(q_out) - predicted) <= 0.005 * predicted
    assert payload_bytes(q_out) < payload_bytes(plain_out)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = load_model(plain_out)(input_ids=ids).logits
        quantized = load_model(q_out)(input_ids=ids).logits
    assert rel_err(quantized, reference) < TOLERANCE[bits]
    # a fresh process with plain transformers (cdmoe not importable) gets the same logits; without
    # gradients, as inference runs, which is when bitsandbytes repacks 4-bit weights on AVX512-BF16
    # CPUs (and fails for the tiny widths unless the shipped modelling file guards it)
    script = (
        "import sys, torch; sys.modules['cdmoe'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(q_out)!r}, trust_remote_code=True, dtype=torch.float32)\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "with torch.no_grad(): print(repr(m(input_ids=ids).logits.double().sum().item()))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert float(run.stdout.strip().splitlines()[-1]) == pytest.approx(float(quantized.double().sum()), rel=1e-5)


def test_layer_drop_then_quantise_and_slim(tiny_model_dir, tmp_path):
    dropped = run_baseline(tiny_model_dir, tmp_path / "ld", BaselineOptions("layer-drop", layers=1), CALIB)
    both = run_baseline(tiny_model_dir, tmp_path / "ldq", BaselineOptions("layer-drop", layers=1, quantize="int8"), CALIB)
    slim = run_baseline(tiny_model_dir, tmp_path / "slim", BaselineOptions("slim", quantize="int8"), CALIB)
    assert both["baseline"]["layers"] == dropped["baseline"]["layers"]
    assert both["weight_bytes"] < dropped["weight_bytes"] and both["weight_bytes"] < slim["weight_bytes"]
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = load_model(tmp_path / "ld")(input_ids=ids).logits
        assert rel_err(load_model(tmp_path / "ldq")(input_ids=ids).logits, reference) < TOLERANCE["int8"]


def test_quantize_model_keeps_non_expert_weights():
    model = make_tiny("deepseek_v2")
    q = quantize_model(model, "int8")
    names = {n for n, m in q.named_modules() if type(m).__module__.startswith("bitsandbytes")}
    assert names and all(".experts." in n for n in names)
    assert not any("self_attn" in n or "shared_experts" in n or "lm_head" in n for n in names)


def test_cpu_repacking_is_turned_off_exactly_where_bitsandbytes_cannot_repack():
    """On AVX512-BF16 CPUs bitsandbytes repacks each 4-bit weight on its first forward and fails
    for widths that are not multiples of its block size (the tiny model's experts: in_features 32).
    Pretend every module may repack (as there), and check the guard's choice against
    bitsandbytes' own repacking function, module by module."""
    import copy

    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    from cdmoe.models.bnb_cpu import guard_cpu_packing

    q = quantize_model(make_tiny("deepseek_v2", hidden_size=128), "int4")
    modules = [m for m in q.modules() if getattr(getattr(m, "weight", None), "quant_state", None) is not None]
    for m in modules:
        m.support_avx512bf16_for_cpu = True
    switched = guard_cpu_packing(q)
    repackable = []
    for m in modules:
        try:
            _convert_weight_packed_for_cpu(m.weight.data.clone(), copy.deepcopy(m.weight.quant_state))
            repackable.append(True)
        except (RuntimeError, AssertionError):
            repackable.append(False)
    assert 0 < switched < len(modules)  # both kinds are present: gate/up (in 128) repack, down (in 32) cannot
    assert [m.support_avx512bf16_for_cpu for m in modules] == repackable
