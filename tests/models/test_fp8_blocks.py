"""Block-FP8 checkpoints: Eq. (1) of cdmoe.models.fp8_blocks against a literal loop over blocks, the
quantiser against DeepSeek's rule, and both loaders (whole, sequential) reading an FP8 checkpoint exactly
as its bf16 cast."""

import json

import pytest
import torch
from fp8_checks import fp8_checkpoints, literal_dequantize, literal_quantize

from cdmoe.errors import CdmoeError
from cdmoe.memory.layer_store import SequentialStore
from cdmoe.models.fp8_blocks import block_fp8, dequantize, quantize
from cdmoe.models.input_checks import check_inputs
from cdmoe.models.loading import load_model

# (rows, cols, block): DeepSeek-V3's 128 x 128 with partial blocks at both edges (its kv_a_proj_with_mqa is
# 576 x 7168: 4.5 blocks of rows), a non-square block (a transposed block size is caught), full blocks
SHAPES = [(200, 300, (128, 128)), (40, 64, (16, 24)), (32, 48, (16, 16))]


def _random_fp8(rows, cols, block, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(rows, cols, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.rand(-(-rows // block[0]), -(-cols // block[1]), generator=gen) * 1e-3 + 1e-5
    return q, s


@pytest.mark.parametrize("rows,cols,block", SHAPES)
def test_dequantize_is_the_literal_block_loop(rows, cols, block):
    q, s = _random_fp8(rows, cols, block)
    got = dequantize(q, s, block)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, literal_dequantize(q, s, block))
    # per expert on a stack (E, rows, cols) too
    q2, s2 = _random_fp8(rows, cols, block, seed=1)
    stacked = dequantize(torch.stack([q, q2]), torch.stack([s, s2]), block)
    assert torch.equal(stacked[1], literal_dequantize(q2, s2, block))


@pytest.mark.parametrize("rows,cols,block", SHAPES)
def test_quantize_is_deepseeks_rule_and_idempotent(rows, cols, block):
    w = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(2)) * 0.05).to(torch.bfloat16)
    w[:block[0], :block[1]] = 0  # an all-zero block: the 1e-4 floor, no division by zero
    q, s = quantize(w, block)
    want_q, want_s = literal_quantize(w, block)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert torch.equal(s, want_s) and torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    # what round_to_storage evaluates is what the writer saves: quantising the dequantised values again
    # gives the same bytes
    q2, s2 = quantize(dequantize(q, s, block), block)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s2, s)
    assert (dequantize(q, s, block).float() - w.float()).abs().max() <= w.float().abs().max() / 16


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    return fp8_checkpoints(tmp_path_factory.mktemp("fp8"), "deepseek_v3", (16, 24))


def test_whole_and_sequential_read_fp8_as_the_bf16_cast(v3):
    fp8, cast = v3
    want = load_model(cast).state_dict()  # fp32 on CPU, from the bf16 cast
    got = load_model(fp8).state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    store = SequentialStore(fp8)
    assert not hasattr(store.model.config, "quantization_config")
    for idx in range(len(store.layers)):
        with store.resident(idx) as layer:
            for name, tensor in layer.state_dict().items():
                assert torch.equal(tensor, want[f"model.layers.{idx}.{name}"]), name
    for name, tensor in store.model.state_dict().items():
        if not name.startswith("model.layers."):
            assert torch.equal(tensor, want[name]), name


def _rewrite(path, tmp_path, config=None, tensors=None):
    """A copy of checkpoint ``path`` with its config and/or tensors changed."""
    import shutil

    from safetensors.torch import load_file, save_file

    new = tmp_path / "changed"
    shutil.copytree(path, new)
    if config is not None:
        (new / "config.json").write_text(json.dumps(config(json.loads((new / "config.json").read_text()))))
    if tensors is not None:
        for shard in new.glob("*.safetensors"):
            save_file(tensors(load_file(shard)), shard, metadata={"format": "pt"})
    return new


def _scales_transposed(state):
    return {k: v.t().contiguous() if k.endswith("_scale_inv") and v.shape[0] != v.shape[1] else v
            for k, v in state.items()}


@pytest.mark.parametrize("change,message", [
    (dict(tensors=_scales_transposed), "has scales of shape"),
    (dict(tensors=lambda st: {k: v for k, v in st.items() if not k.endswith("q_a_proj.weight_scale_inv")}),
     "has no model.layers"),
    (dict(config=lambda c: {**c, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}}),
     "no weight_block_size"),
    (dict(config=lambda c: {**c, "quantization_config": {**c["quantization_config"], "activation_scheme": "static"}}),
     "activation_scheme dynamic only"),
    (dict(config=lambda c: {**c, "quantization_config": {"quant_method": "gptq", "bits": 4}}), r"quantised \(gptq\)"),
    (dict(config=lambda c: {**c, "quantization_config": {"load_in_4bit": True}}), r"quantised \(load_in_4bit\)"),
])
def test_unreadable_quantised_inputs_are_refused_before_any_work(v3, tmp_path, change, message):
    path = _rewrite(v3[0], tmp_path, **change)
    with pytest.raises(CdmoeError, match=message) as err:
        check_inputs(path)
    assert "\n" not in str(err.value) and ("dequantise" in str(err.value) or "weight_block_size" in str(err.value))


def test_an_fp8_entry_over_bf16_weights_is_not_fp8(v3, tmp_path):
    """A bf16 cast that kept ``quantization_config: fp8`` (DeepSeek's script leaves config.json as it is)."""
    stale = _rewrite(v3[1], tmp_path, config=lambda c: {**c, "quantization_config": json.loads(
        (v3[0] / "config.json").read_text())["quantization_config"]})
    assert block_fp8(stale, json.loads((stale / "config.json").read_text())) is None
    check_inputs(stale)
    model = load_model(stale)
    assert getattr(model.config, "quantization_config", None) is None
    want = load_model(v3[1]).state_dict()
    assert all(torch.equal(t, want[k]) for k, t in model.state_dict().items())
