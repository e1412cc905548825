"""The search in bf16 and fp16 picks what it picks in fp32, as far as the precision allows.

On the shipped (trained) demo model: the greedy layer order must be the same in every dtype; the
experts of each condensed layer may differ in a near-tie (bf16 keeps 8 mantissa bits), so at most
one of the K per layer may change; the Eq. 2 gates of the experts both runs chose agree to 0.01.
"""

import pytest
from conftest import DEMO_CALIB, ROOT

from cdmoe.models.loading import load_model, load_tokenizer
from cdmoe.search.calibration import CalibSpec, load_calibration
from cdmoe.search.run import SearchOptions, run_search

DEMO_MODEL = ROOT / "demo" / "model"


@pytest.fixture(scope="module")
def reference():
    tokenizer = load_tokenizer(DEMO_MODEL)
    ids = load_calibration(tokenizer, CalibSpec(str(DEMO_CALIB), 8, 64, 0))
    return ids, run_search(load_model(DEMO_MODEL, dtype="float32"), ids, SearchOptions(layers=3))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_search_matches_fp32(reference, dtype):
    ids, fp32 = reference
    low = run_search(load_model(DEMO_MODEL, dtype=dtype), ids, SearchOptions(layers=3))
    assert low.record["layer_order"] == fp32.record["layer_order"]
    for ref, got in zip(fp32.choices, low.choices, strict=True):
        assert ref.layer == got.layer
        common = set(ref.experts) & set(got.experts)
        assert len(common) >= len(ref.experts) - 1, (dtype, ref, got)
        ref_gates, got_gates = dict(zip(ref.experts, ref.gates)), dict(zip(got.experts, got.gates))
        for expert in common:
            assert got_gates[expert] == pytest.approx(ref_gates[expert], abs=0.01)
