"""Quantised outputs in compressed-tensors format (w8a8, w4a16, fp8), checked against independent computations.

The source is a bf16 checkpoint on disk (so the storage dtypes are exercised); the expected values are
computed here from the source's own tensors: each scale is max |W| over its cell divided by half of the
scheme's range (int8: 127.5, int4: 7.5, float8_e4m3: 448), each code the weight rounded on that grid
(int4 codes unpacked here, not by compressed-tensors), every other tensor the source's bytes.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny
from fidelity_checks import digest, tensors
from safetensors import safe_open

import cdmoe
from cdmoe.checkpoint.writer import save
from cdmoe.errors import CdmoeError
from cdmoe.methods.compressed import check_scheme, prepare_quantized, quantize_compressed
from cdmoe.models.loading import load_model, round_to_checkpoint_dtype

pytest.importorskip("compressed_tensors")
# sizes every scheme fits: input widths multiples of 128 (fp8's activation groups), int4 groups of 32
SIZES = {"hidden_size": 128, "moe_intermediate_size": 128, "intermediate_size": 256, "kv_lora_rank": 128,
         "v_head_dim": 32, "num_hidden_layers": 3}
HALF_RANGE = {"w8a8": 127.5, "w4a16": 7.5, "fp8": 448.0}
CODES = {"w8a8": (-128, 127), "w4a16": (-8, 7)}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny deepseek_v2 checkpoint (layer 0 dense, 1 and 2 MoE) stored in bf16, untied lm_head."""
    path = tmp_path_factory.mktemp("ct") / "source"
    make_tiny("deepseek_v2", seed=5, **SIZES).to(torch.bfloat16).save_pretrained(path)
    return path


def _quantised(source, out, scheme, condense=True, dtype="auto"):
    """Load ``source`` as cdmoe does (``dtype`` auto: fp32 on CPU), optionally condense layer 2, quantise,
    save; (its state dict before quantisation, rounded to storage; the record)."""
    model = load_model(source, dtype=dtype)
    if condense:
        cdmoe.condense_layers(model, [cdmoe.LayerChoice(layer=2, experts=(1, 4), gates=(0.3, 0.2))])
    storage = round_to_checkpoint_dtype(model, source, "auto")
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    model, entry = quantize_compressed(model, scheme, storage)
    save(model, out, {"method": "test", "quantization": entry}, source=source, storage=storage)
    return reference, entry


def _original_weights(reference: dict) -> dict:
    """{module name: (O, I) float32 weight} of every quantised module, from the unquantised state dict:
    fused experts split per expert here; routers (``.gate``) and ``lm_head`` are not quantised."""
    out = {}
    for name, tensor in reference.items():
        if name.endswith(".experts.gate_up_proj"):
            half = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                out[f"{name[:-len('gate_up_proj')]}{e}.gate_proj"] = tensor[e, :half].float()
                out[f"{name[:-len('gate_up_proj')]}{e}.up_proj"] = tensor[e, half:].float()
        elif name.endswith(".experts.down_proj"):
            for e in range(tensor.shape[0]):
                out[f"{name[:-len('down_proj')]}{e}.down_proj"] = tensor[e].float()
        elif name.startswith("model.layers.") and tensor.dim() == 2 and not name.endswith(".gate.weight"):
            out[name.removesuffix(".weight")] = tensor.float()  # attention, MLPs (norms are 1-D)
    return out


def _cells(weight, scheme, group):
    """max |W| per scale cell: (O, 1) rows, (O, I / group) groups, (ceil(O/128), ceil(I/128)) blocks."""
    if scheme == "w8a8":
        return weight.abs().amax(1, keepdim=True)
    if scheme == "w4a16":
        return weight.abs().unflatten(1, (-1, group)).amax(-1)
    rows, cols = -(-weight.shape[0] // 128), -(-weight.shape[1] // 128)
    padded = torch.zeros(rows * 128, cols * 128)
    padded[: weight.shape[0], : weight.shape[1]] = weight.abs()
    return padded.unflatten(0, (rows, 128)).unflatten(2, (cols, 128)).amax((1, 3))


def _expand(scale, weight, scheme, group):
    if scheme == "w8a8":
        return scale.expand_as(weight)
    if scheme == "w4a16":
        return scale.repeat_interleave(group, 1)
    return scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[: weight.shape[0], : weight.shape[1]]


def _codes(stored: dict, module: str, scheme: str) -> torch.Tensor:
    if scheme == "w4a16":  # eight 4-bit codes per int32, lowest bits first, offset by 8
        packed = stored[f"{module}.weight_packed"].to(torch.int64) & 0xFFFFFFFF
        nibbles = (packed[..., None] >> (4 * torch.arange(8))) & 0xF
        return (nibbles.flatten(1) - 8).float()[:, : int(stored[f"{module}.weight_shape"][1])]
    return stored[f"{module}.weight"].float()


@pytest.mark.parametrize("scheme,dtype", [("w8a8", "auto"), ("w4a16", "auto"), ("fp8", "auto"), ("w4a16", "bf16")])
def test_codes_and_scales_are_round_to_nearest_of_the_stored_weights(source, tmp_path, scheme, dtype):
    """Also when computing in bf16 (a GPU's default): the codes are still the fp32 rounding."""
    reference, entry = _quantised(source, tmp_path / scheme, scheme, dtype=dtype)
    stored = tensors(tmp_path / scheme)
    group = entry["weights"]["group_size"]
    originals = _original_weights(reference)
    assert len(originals) == entry["linear_modules"] > 0
    assert group == (128 if scheme == "w4a16" else None)  # every input width is a multiple of 128 (SIZES)
    for module, weight in originals.items():
        scale = stored[f"{module}.weight_scale"]
        assert scale.dtype == torch.float32  # q * s exact wherever it is dequantised
        expected = _cells(weight, scheme, group) / HALF_RANGE[scheme]
        assert scale.shape == expected.shape, module
        torch.testing.assert_close(scale, expected, rtol=1e-6, atol=0)
        step = _expand(scale, weight, scheme, group)
        codes = _codes(stored, module, scheme)
        error = (weight - codes * step).abs()
        if scheme == "fp8":  # e4m3: 3 mantissa bits (half an ulp: 1/16 relative), subnormal step 2^-9
            assert (error <= torch.maximum(weight.abs() / 16, step * 2 ** -10) * (1 + 1e-5)).all(), module
        else:  # the row's (group's) extreme sits at 127.5 (7.5) steps: clamped to 127 (7), half a step off
            low, high = CODES[scheme]
            assert codes.min() >= low and codes.max() <= high, module
            assert (error <= step / 2 + weight.abs() * 1e-6).all(), module  # (fp32 rounding of q * s)
    kept = {k: v for k, v in stored.items() if not k.startswith(tuple(originals))}
    assert {k.rsplit(".", 1)[0] for k in kept} >= {"lm_head", "model.embed_tokens", "model.norm", "model.layers.1.mlp.gate"}


def test_untouched_tensors_are_the_source_bytes(source, tmp_path):
    _quantised(source, tmp_path / "out", "w8a8")
    stored, original = tensors(tmp_path / "out"), tensors(source)
    quantised = {k.removesuffix(".weight_scale") for k in stored if k.endswith(".weight_scale")}
    kept = [k for k in stored if k.rsplit(".", 1)[0] not in quantised]
    assert any(k.endswith("mlp.gate.weight") for k in kept) and "lm_head.weight" in kept
    for name in kept:  # embeddings, norms, routers, lm_head
        assert digest(stored[name]) == digest(original[name]), name


@pytest.mark.parametrize("scheme,fmt", [("w8a8", "cdmoe"), ("w4a16", "family")])
def test_transformers_loads_the_fake_quantised_model(source, tmp_path, scheme, fmt):
    """Plain transformers (compressed-tensors' own decompression) gives the logits of the in-memory model
    with the same scales (compressed-tensors' fake quantisation: weights, and w8a8's activations)."""
    model = load_model(source)
    storage = round_to_checkpoint_dtype(model, source, "auto")
    from cdmoe.models.storage_dtypes import cast_to_storage

    cast_to_storage(model, storage)
    expected_model = prepare_quantized(model.float(), scheme, torch.float32)  # from the stored bf16 values
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = expected_model(input_ids=ids).logits
    _quantised(source, tmp_path / "out", scheme, condense=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert (config["model_type"] == "cdmoe") == (fmt == "cdmoe")
    with torch.no_grad():
        got = load_model(tmp_path / "out")(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    if fmt == "family":  # no cdmoe code at all: a process where cdmoe cannot be imported
        torch.save((ids, expected), tmp_path / "expected.pt")
        script = f"""
import sys
sys.modules["cdmoe"] = None
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}, dtype=torch.float32).eval()
ids, expected = torch.load({str(tmp_path / 'expected.pt')!r})
with torch.no_grad():
    torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
print("OK", type(model).__name__)
"""
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "OK DeepseekV2ForCausalLM" in result.stdout


def test_a_scheme_that_does_not_fit_is_refused_before_loading(source, tmp_path):
    with pytest.raises(CdmoeError, match="unknown compressed-tensors scheme 'w3a3'"):
        check_scheme("w3a3", source)
    make_tiny("deepseek_v2").save_pretrained(tmp_path / "narrow")  # input widths 16, 32, 64, 96
    with pytest.raises(CdmoeError, match=r"fp8 .* multiple of 128; this model has \[16, 32, 64, 96\]"):
        check_scheme("fp8", tmp_path / "narrow")
    with pytest.raises(CdmoeError, match=r"w4a16 needs input widths divisible by 32"):
        check_scheme("w4a16", tmp_path / "narrow")
    check_scheme("w8a8", tmp_path / "narrow")  # per-row scales fit any width


@pytest.mark.parametrize("scheme", ["w8a8", "w4a16"])
def test_compare_predicts_the_bytes_written(source, tmp_path, scheme):
    """``slim-SCHEME``'s predicted ratio (parameter accounting, :mod:`cdmoe.comparison.budgets`) against the
    bytes the output's weight file really holds over the source's (both bf16 sources: 2 bytes a weight)."""
    from cdmoe.comparison.budgets import candidate_ratios, parse_methods
    from cdmoe.models.budget import model_params

    params = model_params(load_model(source, dtype="auto"))
    predicted = candidate_ratios(parse_methods(f"slim-{scheme}")[0], params, None, 2, 8)[0]
    _quantised(source, tmp_path / "out", scheme, condense=False)
    written = (tmp_path / "out" / "model.safetensors").stat().st_size / (source / "model.safetensors").stat().st_size
    # the prediction leaves out w8a8's fp32 row scales (4 bytes per row of >= 128 one-byte codes: < 3.2% of the
    # codes' bytes, codes ~half the source's bytes here: < 0.016 of the ratio) and the file headers
    assert 0 <= written - predicted < (0.02 if scheme == "w8a8" else 0.012)


def test_a_block_fp8_source_is_refused_before_loading(tmp_path):
    """A block-FP8 source keeps its own FP8 bytes and scales in its outputs: --quantize is refused, in one line."""
    from fp8_checks import fp8_checkpoints

    fp8, _ = fp8_checkpoints(tmp_path, "deepseek_v3", [128, 128], **{k: SIZES[k] for k in ("hidden_size",)})
    with pytest.raises(CdmoeError, match=r"already quantised \(block FP8\).*drop --quantize w8a8") as refused:
        check_scheme("w8a8", fp8)
    assert "\n" not in str(refused.value)


def test_a_linear_shared_expert_gate_is_kept(tmp_path):
    """qwen2_moe's per-token shared-expert gate is an nn.Linear (H -> 1): kept with the source's bytes, not quantised."""
    source = tmp_path / "qwen2_moe"
    make_tiny("qwen2_moe", seed=2).to(torch.bfloat16).save_pretrained(source)
    _quantised(source, tmp_path / "out", "w8a8", condense=False)
    stored, original = tensors(tmp_path / "out"), tensors(source)
    gates = [k for k in original if k.endswith("shared_expert_gate.weight")]
    assert gates and not any(k.startswith(g.removesuffix("weight")) and k != g for g in gates for k in stored)
    assert all(digest(stored[g]) == digest(original[g]) for g in gates)
    assert any(k.endswith("shared_expert.up_proj.weight_scale") for k in stored)  # its neighbours are quantised


def test_condense_and_slim_write_w8a8_outputs_end_to_end(tiny_model_dir, tmp_path):
    """condense --quantize w8a8 and baseline slim --quantize w8a8: compressed-tensors directories whose
    perplexity, measured from disk after saving, is the plain condensed one's within int8's error."""
    from conftest import DEMO_CALIB, DEMO_TEXT

    from cdmoe.methods.baselines import BaselineOptions, run_baseline
    from cdmoe.methods.condense import EvalOptions, condense
    from cdmoe.search.calibration import CalibSpec
    from cdmoe.search.run import SearchOptions

    calib, search = CalibSpec(str(DEMO_CALIB), 4, 32, 0), SearchOptions(layers=2, experts=2)
    record = condense(tiny_model_dir, tmp_path / "cd", search, calib, EvalOptions(str(DEMO_TEXT), 512, baselines=False),
                      show_progress=False, quantize="w8a8")
    saved = json.loads((tmp_path / "cd" / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "compressed-tensors"
    assert record["quantization"]["scheme"] == "w8a8" and record["quantization"]["output_format"] == "cdmoe"
    ev = record["evaluation"]
    assert abs(ev["quantized_ppl"] / ev["condensed_ppl"] - 1) < 0.02, ev
    slim = run_baseline(tiny_model_dir, tmp_path / "slim", BaselineOptions("slim", quantize="w8a8"), calib)
    assert slim["quantization"]["scheme"] == "w8a8"
    assert json.loads((tmp_path / "slim" / "config.json").read_text())["quantization_config"]["format"] == "int-quantized"


@pytest.mark.parametrize("scheme", ["w8a8", "w4a16"])
def test_sequential_mode_writes_whole_modes_quantised_checkpoint(tmp_path, scheme):
    """condense --quantize SCHEME --mode sequential (one decoder layer in memory, quantised as it is written)
    writes every tensor, the config and the record entry of --mode whole: condensed MLPs (gated experts, fused in
    fp32, rounded to the stored bf16 before quantisation) and routed experts unfused."""
    from conftest import DEMO_CALIB, tiny_tokenizer

    from cdmoe.methods.condense import condense
    from cdmoe.search.calibration import CalibSpec
    from cdmoe.search.run import SearchOptions

    tok = tiny_tokenizer()
    path = tmp_path / "source"
    make_tiny("deepseek_v2", seed=5, vocab_size=len(tok), bos_token_id=0, eos_token_id=0, pad_token_id=0,
              **SIZES).to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    calib, search = CalibSpec(str(DEMO_CALIB), 4, 32, 0), SearchOptions(layers=1, experts=2)
    records = {mode: condense(path, tmp_path / mode, search, calib, show_progress=False, mode=mode, quantize=scheme)
               for mode in ("whole", "sequential")}
    a, b = tensors(tmp_path / "whole"), tensors(tmp_path / "sequential")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert records["whole"]["quantization"] == records["sequential"]["quantization"]
    assert records["whole"]["condensed"] == records["sequential"]["condensed"]
    configs = [json.loads((tmp_path / m / "config.json").read_text()) for m in ("whole", "sequential")]
    formats = {"w8a8": "int-quantized", "w4a16": "pack-quantized"}
    assert configs[0] == configs[1] and configs[0]["quantization_config"]["format"] == formats[scheme]
    layer = records["whole"]["condensed"][0]["layer"]
    assert any(k.startswith(f"model.layers.{layer}.mlp.") and k.endswith("weight_scale") for k in a)


def test_condense_heal_quantize_is_the_healed_output_quantised(tiny_model_dir, tmp_path):
    """condense --heal --quantize w8a8 == condense --heal, then cdmoe baseline slim --quantize w8a8 of its output."""
    from conftest import DEMO_CALIB

    from cdmoe.methods.baselines import BaselineOptions, run_baseline
    from cdmoe.methods.condense import condense
    from cdmoe.search.calibration import CalibSpec
    from cdmoe.search.heal_fit import HealOptions
    from cdmoe.search.run import SearchOptions

    calib, search, heal = CalibSpec(str(DEMO_CALIB), 8, 32, 0), SearchOptions(layers=2, experts=2), HealOptions(steps=8)
    healed = condense(tiny_model_dir, tmp_path / "healed", search, calib, show_progress=False, heal=heal)
    run_baseline(tmp_path / "healed", tmp_path / "slim", BaselineOptions("slim", quantize="w8a8"))
    record = condense(tiny_model_dir, tmp_path / "both", search, calib, show_progress=False, heal=heal,
                      quantize="w8a8")
    assert record["condensed"] == healed["condensed"] and record["heal"]["layers"].keys() == healed["heal"]["layers"].keys()
    assert record["quantization"]["scheme"] == "w8a8"
    got, expected = tensors(tmp_path / "both"), tensors(tmp_path / "slim")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    with pytest.raises(CdmoeError, match="bitsandbytes"):
        condense(tiny_model_dir, tmp_path / "bnb", search, calib, show_progress=False, heal=heal, quantize="int4")
