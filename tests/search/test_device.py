"""The search on an accelerator: every tensor stays on the compute device, the host reads one number
per Algorithm 2 candidate and one score vector per Algorithm 1 step, and the choices are the CPU's.
tests/pretend_device.py stands in for a GPU (mixing its tensors with CPU ones raises, as on CUDA)."""

import pytest
import torch
from conftest import make_tiny
from pretend_device import DEVICE, PretendDevice, to_pretend_device

from cdmoe.models.adapter import moe_blocks
from cdmoe.search import layer_search
from cdmoe.search.expert_search import LayerActivations, SearchMemory, fixed_gates, greedy_experts
from cdmoe.search.run import SearchOptions, run_search


@pytest.mark.parametrize("family,layers,final", [("qwen2_moe", 2, "logits"), ("deepseek_v3", 3, "hidden")])
def test_search_on_a_device_chooses_what_the_cpu_chooses(family, layers, final, monkeypatch):
    model = make_tiny(family, seed=3, num_hidden_layers=layers)
    model.set_experts_implementation("eager")  # transformers' grouped kernel branches on the device type
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    options = SearchOptions(layers=2, experts=2, batch_size=1, final=final)
    on_cpu = run_search(model, ids, options)
    reads = []
    with PretendDevice() as device:
        score = layer_search.score_outputs

        def counted(*args, **kwargs):
            before = device.to_host
            out = score(*args, **kwargs)
            reads.append(device.to_host - before)
            return out

        monkeypatch.setattr(layer_search, "score_outputs", counted)
        on_device = run_search(to_pretend_device(model), ids, options)  # raises if a CPU tensor meets a device one
    assert on_device.choices == on_cpu.choices
    assert on_device.record["layer_step_scores"] == pytest.approx(on_cpu.record["layer_step_scores"], rel=1e-6)
    assert reads and set(reads) == {1}  # one number per scored candidate, not one per batch or chunk


@pytest.mark.parametrize("cache_bytes", [0, 2**30])
def test_algorithm_1_reads_one_score_vector_per_step_back(cache_bytes):
    model = make_tiny("qwen2_moe", seed=1)
    block = moe_blocks(model)[0]
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = block.module(x.unsqueeze(0))
    y = (y[0] if isinstance(y, tuple) else y).squeeze(0)
    k = 3
    small = SearchMemory(work_bytes=4 * 64 * 7 * 5, cache_bytes=cache_bytes)  # 4-token chunks, 1-candidate groups
    expected = greedy_experts(block, LayerActivations(x=x, y=y, h=x + y), fixed_gates(block, x)[0], k, memory=small)
    with PretendDevice() as device:
        to_pretend_device(model)
        xd, yd = x.to(DEVICE), y.to(DEVICE)
        gates = fixed_gates(block, xd)[0]
        before = device.to_host
        found = greedy_experts(block, LayerActivations(x=xd, y=yd, h=xd + yd), gates, k, memory=small)
        # the shared-only score, one (C,) vector per step, the kept gates: never once per chunk or candidate
        assert device.to_host - before == 1 + k + 1
    assert (found.experts, found.gates, found.step_scores) == (expected.experts, expected.gates, expected.step_scores)
