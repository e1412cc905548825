"""Output fidelity: every tensor a method does not change is written with the source's dtype and bytes.

The source is a tiny DeepSeek-V3 checkpoint stored as the real one is: bf16 weights, with the
routers (``gate.weight``, ``e_score_correction_bias``) in fp32, which transformers keeps in fp32
on purpose (``_keep_in_fp32_modules_strict``). cdmoe computes in fp32 on CPU; a single
``model.to(bf16)`` before saving would round the routers (the mutant these tests catch).
"""

import json

import pytest
import torch
from conftest import DEMO_CALIB, ROOT, make_tiny, tiny_tokenizer
from fidelity_checks import digest, expected_untouched, tensors

import cdmoe
from cdmoe.comparison.sweep import sweep
from cdmoe.methods.condense import EvalOptions, condense
from cdmoe.search.calibration import CalibSpec
from cdmoe.search.run import SearchOptions

CALIB = CalibSpec(str(DEMO_CALIB), 4, 32, 0)
DEMO_MODEL = ROOT / "demo" / "model"


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory):
    """Tiny deepseek_v3: bf16 on disk, routers in fp32 (as DeepSeek-V3's own checkpoint), final norm in fp32."""
    tok = tiny_tokenizer()
    model = make_tiny("deepseek_v3", seed=3, num_hidden_layers=4, vocab_size=len(tok), bos_token_id=0,
                      eos_token_id=0, pad_token_id=0)
    model.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        if name.endswith("mlp.gate"):  # values bf16 cannot hold
            module.weight.data = module.weight.data.float() + 1e-3 * torch.randn(module.weight.shape, generator=gen)
            bias = module.e_score_correction_bias
            module.e_score_correction_bias.data = bias.float() + 1e-2 * torch.randn(bias.shape, generator=gen)
    model.model.norm.weight.data = model.model.norm.weight.data.float() + 1e-3  # stored in fp32 by no family rule
    path = tmp_path_factory.mktemp("v3") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def assert_untouched_identical(source_dir, out_dir):
    record = json.loads((out_dir / "cdmoe.json").read_text())
    condensed = {c["layer"] for c in record["condensed"]}
    written = tensors(out_dir)
    want = expected_untouched(tensors(source_dir), condensed)
    assert condensed and want
    for name, tensor in want.items():
        assert name in written, name
        assert digest(written[name]) == digest(tensor), name
    return written, condensed


@pytest.mark.parametrize("mode", ["whole", "sequential"])
def test_untouched_tensors_are_the_source_bytes(v3_dir, tmp_path, mode):
    out = tmp_path / mode
    condense(v3_dir, out, SearchOptions(layers=1, experts=2), CALIB, EvalOptions(), show_progress=False, mode=mode)
    written, condensed = assert_untouched_identical(v3_dir, out)
    routers = [n for n in written if n.endswith(("mlp.gate.weight", "e_score_correction_bias"))]
    assert routers and all(written[n].dtype == torch.float32 for n in routers)
    # the condensed layer's new tensors are in the checkpoint's dtype
    new = [n for n in written if any(n.startswith(f"model.layers.{i}.mlp.") for i in condensed)]
    assert new and all(written[n].dtype == torch.bfloat16 for n in new)


def test_routing_of_untouched_layers_is_unchanged(v3_dir, tmp_path):
    out = tmp_path / "out"
    condense(v3_dir, out, SearchOptions(layers=1, experts=2), CALIB, EvalOptions(), show_progress=False)
    condensed = {c["layer"] for c in json.loads((out / "cdmoe.json").read_text())["condensed"]}
    original = cdmoe.load_model(v3_dir, dtype="auto")
    loaded = cdmoe.load_model(out, dtype="auto")
    hidden = torch.randn(2048, original.config.hidden_size, generator=torch.Generator().manual_seed(1))
    checked = 0
    for i, layer in enumerate(original.model.layers):
        if i in condensed or not hasattr(layer.mlp, "gate"):
            continue
        with torch.no_grad():
            _, w_a, idx_a = layer.mlp.gate(hidden)  # (tokens, top_k) gates and expert ids
            _, w_b, idx_b = loaded.model.layers[i].mlp.gate(hidden)
        assert torch.equal(idx_a, idx_b) and torch.equal(w_a, w_b)
        checked += 1
    assert checked >= 2


def test_apply_and_api_keep_the_source_dtypes(v3_dir, tmp_path):
    first = tmp_path / "first"
    condense(v3_dir, first, SearchOptions(layers=1, experts=2), CALIB, EvalOptions(), show_progress=False)
    applied = cdmoe.apply_record(v3_dir, first / "cdmoe.json", tmp_path / "applied")
    assert_untouched_identical(v3_dir, applied)
    model = cdmoe.load_model(v3_dir)  # fp32 compute on CPU
    record = cdmoe.condense_layers(model, cdmoe.checkpoint.record.choices_from_record(json.loads((first / "cdmoe.json").read_text())))
    out = cdmoe.save(model, tmp_path / "api", record, source=v3_dir)
    assert_untouched_identical(v3_dir, out)
    assert {digest(t) for t in tensors(out).values()} == {digest(t) for t in tensors(applied).values()}


def payload_bytes(directory):
    return sum(t.numel() * t.element_size() for t in tensors(directory).values())


def test_every_entry_point_writes_the_planned_bytes_of_the_bf16_demo_model(tmp_path):
    """condense (whole, sequential), apply, sweep and the Python API write the bf16 demo model's
    condensed checkpoint in bf16: bytes within 1% of ``cdmoe plan`` (before: apply and the API
    wrote fp32, 1.86x), untouched tensors identical to the source."""
    search = SearchOptions(layers=2, experts=4)
    predicted = cdmoe.plan(DEMO_MODEL, layers=2, experts=4)["condensed_bytes"]
    outputs = {}
    for mode in ("whole", "sequential"):
        outputs[mode] = tmp_path / mode
        condense(DEMO_MODEL, outputs[mode], search, CALIB, EvalOptions(), show_progress=False, mode=mode)
    outputs["apply"] = cdmoe.apply_record(DEMO_MODEL, outputs["whole"] / "cdmoe.json", tmp_path / "apply")
    sweep(DEMO_MODEL, tmp_path / "sweep", [2], search, CALIB)
    outputs["sweep"] = tmp_path / "sweep" / "layers-2"
    model = cdmoe.load_model(DEMO_MODEL)
    record = json.loads((outputs["whole"] / "cdmoe.json").read_text())
    api_record = cdmoe.condense_layers(model, cdmoe.checkpoint.record.choices_from_record(record))
    outputs["api"] = cdmoe.save(model, tmp_path / "api", api_record, source=DEMO_MODEL)
    for name, out in outputs.items():
        assert abs(payload_bytes(out) - predicted) <= 0.01 * predicted, name
        assert_untouched_identical(DEMO_MODEL, out)
        saved = json.loads((out / "cdmoe.json").read_text())
        assert saved["params"]["condensed_bytes"] == pytest.approx(predicted, rel=0.01), name
