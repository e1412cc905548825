"""The memory estimate against an independent measurement (torch's profiler: every tensor allocated and
freed during a real condense of a small model), and the decisions ``condense`` takes from it before
anything is loaded. The same comparison at real widths, against the peak RSS, is
benchmarks/plan_vs_peak.py."""

import json
import shutil

import pytest
import torch
from conftest import DEMO_CALIB, make_tiny, tiny_tokenizer
from fp8_checks import fp8_checkpoints
from torch.profiler import ProfilerActivity, profile
from typer.testing import CliRunner

from cdmoe.cli import app
from cdmoe.errors import CdmoeError
from cdmoe.io.output_dir import partial_dir
from cdmoe.memory import devices
from cdmoe.memory.estimate import IMPORTS_BYTES, OUTPUT_FILES_BYTES, RunShape, SearchMemory, estimate, load_peak
from cdmoe.memory.fit import FIT_FRACTION, Free, choose_run
from cdmoe.memory.layer_store import SequentialStore
from cdmoe.methods.condense import condense
from cdmoe.models.budget import tensor_sizes
from cdmoe.models.plan import count
from cdmoe.search.calibration import CalibSpec
from cdmoe.search.run import SearchOptions

cli = CliRunner()
GiB = 2**30


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    """A qwen2_moe checkpoint in bf16 (per-expert keys, as published) whose experts dominate a layer."""
    tok = tiny_tokenizer()
    model = make_tiny("qwen2_moe", seed=0, hidden_size=128, moe_intermediate_size=256, shared_expert_intermediate_size=256,
                      num_hidden_layers=3, vocab_size=len(tok), bos_token_id=0, eos_token_id=0, pad_token_id=0)
    path = tmp_path_factory.mktemp("bf16") / "model"
    model.to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _live_peak(prof, file_bytes) -> int:
    """Most bytes of CPU tensors alive at once during a profile (its allocation events, in time order),
    the checkpoint file's own mapping left out if it shows (safetensors maps a whole file each time it
    opens one; only the pages read become resident)."""
    from torch._C._profiler import _EventType

    files = {file_bytes} if isinstance(file_bytes, int) else set(file_bytes)
    events, nodes = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        if node.typed[0] == _EventType.Allocation and abs(node.typed[1].alloc_size) not in files:
            events.append((node.start_time_ns, node.typed[1].alloc_size))
        nodes.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def _profiled():
    return profile(activities=[ProfilerActivity.CPU], profile_memory=True)


def _file_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def test_a_layer_loads_one_tensor_at_a_time_largest_first(bf16_model):
    store = SequentialStore(bf16_model, dtype=torch.float32)
    with _profiled() as prof:
        store.materialize(1)
    # the fused gate_up first: its 2E per-expert sources in fp32 and the fused copy; then the rest, one by one
    assert _live_peak(prof, _file_bytes(bf16_model)) == load_peak(tensor_sizes(store.layers[1]), 4, 2, cpu=True)[0]


@pytest.mark.parametrize("mode,activations,final,quantize", [
    ("sequential", "memory", "hidden", None), ("sequential", "disk", "logits", None), ("whole", "memory", "logits", None),
    ("sequential", "disk", "logits", "w8a8")])  # written quantised, layer by layer: a copy of the layer and its codes
def test_estimate_bounds_the_tensors_of_a_real_run(bf16_model, tmp_path, mode, activations, final, quantize):
    out = tmp_path / "out"
    with _profiled() as prof:
        record = condense(bf16_model, out, SearchOptions(layers=1, batch_size=2, final=final),
                          CalibSpec(str(DEMO_CALIB), samples=4, seq_len=32), show_progress=False, mode=mode,
                          activations=activations, quantize=quantize)
    planned = record["search"]["memory_plan"]
    assert (planned["mode"], planned["activations"]) == (mode, activations)
    measured = _live_peak(prof, _file_bytes(bf16_model))
    predicted = planned["host_need_bytes"] - IMPORTS_BYTES  # tensors only: no interpreter, no file pages
    assert 0.6 <= measured / predicted <= 1.15, (measured, predicted, planned["phases"])


def test_an_fp8_source_costs_its_bf16_cast_in_memory_and_its_own_bytes_on_disk(tmp_path):
    """A block-FP8 checkpoint is computed dequantised (4 bytes a weight here, never its file's 1), and its
    FP8 output is the size of its fp8 bytes and scales, not of its config's bf16."""
    fp8, _ = fp8_checkpoints(tmp_path, "deepseek_v3", (16, 24), hidden_size=128, moe_intermediate_size=256,
                             intermediate_size=256)
    out = tmp_path / "out"
    with _profiled() as prof:
        record = condense(fp8, out, SearchOptions(layers=1, batch_size=2), CalibSpec(str(DEMO_CALIB), samples=4,
                          seq_len=32), show_progress=False, mode="sequential", activations="memory")
    planned = record["search"]["memory_plan"]
    measured = _live_peak(prof, [f.stat().st_size for f in fp8.glob("*.safetensors")])
    assert 0.6 <= measured / (planned["host_need_bytes"] - IMPORTS_BYTES) <= 1.15, (measured, planned)
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    weights = planned["output_bytes"] - OUTPUT_FILES_BYTES  # the checkpoint's bytes: an upper bound
    assert 0.6 <= written / weights <= 1, (written, weights)


def _params(model):
    return count(model)[1]


def _shape(**kw):
    """A CPU run of 64 x 64 tokens, Algorithm 1 with its least budget (what the fit is checked with)."""
    return RunShape(**{"mode": "whole", "device": "cpu", "compute_bytes": 4, "storage_bytes": 2, "samples": 64,
                       "seq_len": 64, "batch_size": 8, "search": SearchMemory(cache_bytes=0), **kw})


def _need(params, mode, activations):
    return estimate(params, _shape(mode=mode, activations=activations)).host_need_bytes / FIT_FRACTION


ORDER = [("whole", "memory"), ("whole", "disk"), ("sequential", "memory"), ("sequential", "disk")]


def test_auto_takes_the_first_run_that_fits(bf16_model):
    params = _params(bf16_model)
    needs = {pair: _need(params, *pair) for pair in ORDER}
    assert needs[("sequential", "disk")] < needs[("sequential", "memory")] < needs[("whole", "memory")]
    for host in sorted(needs.values()):
        host = int(host) + 1
        expected = next(pair for pair in ORDER if needs[pair] <= host)
        free = Free(device=host, host=host, disk=100 * GiB, activation_disk=100 * GiB)
        choice = choose_run(params, _shape(), "auto", "auto", free)
        assert (choice.mode, choice.activations) == expected
        assert choice.estimate.host_need_bytes <= FIT_FRACTION * host  # the sized cache still fits
        assert (choose_run(params, _shape(), "sequential", "memory", free).mode == "sequential"
                if needs[("sequential", "memory")] <= host else True)  # a fixed mode is kept


def test_nothing_fits_is_one_line_naming_what_is_short(bf16_model):
    params = _params(bf16_model)
    free = Free(device=2**20, host=2**20, disk=100 * GiB, activation_disk=100 * GiB)
    with pytest.raises(CdmoeError) as err:
        choose_run(params, _shape(), "auto", "memory", free)
    need = estimate(params, _shape(mode="sequential")).host_need_bytes / FIT_FRACTION
    message = str(err.value)
    assert "\n" not in message and "--mode sequential --activations memory" in message
    assert f"host RAM needs {need / GiB:.1f} GiB, 0.0 GiB free ({need / GiB:.1f} GiB short)" in message
    disk = Free(device=100 * GiB, host=100 * GiB, disk=2**20, activation_disk=2**20)
    with pytest.raises(CdmoeError, match="disk needs"):
        choose_run(params, _shape(), "whole", "memory", disk)
    unchecked = choose_run(params, _shape(), "auto", "auto", free, check=False)
    assert (unchecked.mode, unchecked.activations, unchecked.fits) == ("sequential", "disk", False)


def test_a_gpu_run_is_checked_against_that_one_gpu(bf16_model, monkeypatch):
    free = {0: 3 * GiB, 1: 70 * GiB}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free[i], 80 * GiB))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert devices.available_bytes(torch.device("cuda")) == 3 * GiB  # never 73 GiB
    assert devices.available_bytes(torch.device("cuda:1")) == 70 * GiB
    params = _params(bf16_model)
    gpu = _shape(device="cuda", compute_bytes=2)
    small = Free(device=2**20, host=100 * GiB, disk=100 * GiB, activation_disk=100 * GiB, device_name="cuda:0")
    with pytest.raises(CdmoeError, match="GPU cuda:0 needs"):
        choose_run(params, gpu, "whole", "memory", small)


def test_the_expert_cache_grows_into_what_is_free(bf16_model):
    params = _params(bf16_model)
    full = 8 * 64 * 64 * 128 * 4  # E x T x H x fp32
    roomy = Free(device=100 * GiB, host=100 * GiB, disk=100 * GiB, activation_disk=100 * GiB)
    assert choose_run(params, _shape(), "whole", "memory", roomy).search.cache_bytes == full
    tight = int(_need(params, "whole", "memory")) + full  # room for half the full cache
    choice = choose_run(params, _shape(), "whole", "memory", Free(tight, tight, 100 * GiB, 100 * GiB))
    assert 0 < choice.search.cache_bytes < full and choice.estimate.host_need_bytes <= FIT_FRACTION * tight


def test_condense_stops_before_loading_anything_when_memory_is_short(bf16_model, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("loaded a model although it does not fit")

    monkeypatch.setattr("cdmoe.methods.session.free_now", lambda *a: Free(2**20, 2**20, 100 * GiB, 100 * GiB))
    monkeypatch.setattr("cdmoe.methods.session.load_model", never)
    monkeypatch.setattr("cdmoe.methods.session.SequentialStore", never)
    out = tmp_path / "out"
    result = cli.invoke(app, ["condense", str(bf16_model), "--out", str(out), "--layers", "1", "--calib",
                              str(DEMO_CALIB), "--samples", "4", "--seq-len", "16", "--quiet"])
    assert result.exit_code == 2 and "short" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 3  # one message, wrapped by the console
    assert not out.exists() and not partial_dir(out).exists()


def test_plan_json_is_the_run_condense_does(bf16_model, tmp_path):
    options = ["--layers", "1", "--samples", "4", "--seq-len", "32", "--batch-size", "2", "--mode", "sequential"]
    shown = cli.invoke(app, ["plan", str(bf16_model), *options, "--json"])
    assert shown.exit_code == 0, shown.output
    planned = json.loads(shown.stdout)
    assert {"peak_device_bytes", "peak_host_bytes", "disk_bytes", "mode", "activations", "phases"} <= set(planned)
    out = tmp_path / "out"
    done = cli.invoke(app, ["condense", str(bf16_model), "--out", str(out), *options, "--calib", str(DEMO_CALIB),
                            "--quiet"])
    assert done.exit_code == 0, done.output
    ran = json.loads((out / "cdmoe.json").read_text())["search"]["memory_plan"]
    for key in ("mode", "activations", "peak_host_bytes", "peak_device_bytes", "disk_bytes", "cache_bytes"):
        assert planned[key] == ran[key], key
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert written <= planned["disk_bytes"]
    shutil.rmtree(out)
