"""``--activations disk``: calibration hidden states in safetensors files, same selections as in memory."""

import gc
import json
import re

import pytest
import torch
from conftest import DEMO_CALIB
from test_sequential import _calib, _sharded
from typer.testing import CliRunner

from cdmoe.cli import app
from cdmoe.io.output_dir import STATE_DIR, partial_dir
from cdmoe.memory.activation_cache import DIR_PREFIX, DiskActivations
from cdmoe.memory.layer_store import SequentialStore
from cdmoe.methods.condense import condense
from cdmoe.models.loading import load_model, load_tokenizer
from cdmoe.search.calibration import CalibSpec, load_calibration
from cdmoe.search.layer_search import LayerSearchResult
from cdmoe.search.resume import SearchState, run_key
from cdmoe.search.run import SearchOptions, run_search

cli = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread; the machine is shared
FILE = re.compile(r"(input|stream)-(\d+)-(\d+)\.safetensors")


def _search(path, mode, ids, options, activations=None, progress=None):
    if mode == "whole":
        model, store = load_model(path), None
    else:
        store = SequentialStore(path)
        model = store.model
    return run_search(model, ids, options, progress, store=store, activations=activations)


def _entries(cache: DiskActivations) -> set[tuple[str, int, int]]:
    return {(m[1], int(m[2]), int(m[3])) for m in (FILE.fullmatch(f.name) for f in cache.files())}


def _without_timings(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "timings"}


@pytest.mark.parametrize("family,mode", [("deepseek_v2", "sequential"), ("deepseek_v2", "whole"),
                                         ("qwen2_moe", "sequential")])
def test_disk_search_equals_memory_search(family, mode, tmp_path):
    path = _sharded(tmp_path, family)
    ids = _calib()
    options = SearchOptions(layers=3, experts=2, batch_size=4)
    memory = _search(path, mode, ids, options)
    with DiskActivations(tmp_path / "acts") as cache:
        disk = _search(path, mode, ids, options, activations=cache)
    assert disk.choices == memory.choices
    assert _without_timings(disk.record) == _without_timings(memory.record)  # same bits: scores, gates, order
    assert not cache.directory.exists() and list((tmp_path / "acts").iterdir()) == []


def _hidden_tensors(shape: tuple[int, ...]) -> int:
    """Live tensors of exactly ``shape`` (calibration hidden states of one batch)."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is torch.Tensor and tuple(o.shape) == shape)


def test_disk_cache_keeps_hidden_states_in_files_not_in_memory(tmp_path):
    path = _sharded(tmp_path, "deepseek_v2", num_hidden_layers=6)  # layer 0 dense, layers 1..5 MoE
    ids = _calib(n=6, s=20)
    batch, batches = 3, 2
    options = SearchOptions(layers=3, experts=1, batch_size=batch)
    shape = (batch, ids.shape[1], 64)
    moe = range(1, 6)
    live = {}

    def count_in_memory(stage, done, total):
        if stage == "experts" and done == total:  # Algorithm 1 finished, nothing running
            live["memory"] = _hidden_tensors(shape)

    memory = _search(path, "sequential", ids, options, progress=count_in_memory)

    seen = {"inputs": [], "max_streams": 0}

    class Watched(DiskActivations):
        def put(self, key, hidden):
            super().put(key, hidden)
            assert key in _entries(self)  # on disk right after the write
            streams = sum(kind == "stream" for kind, _, _ in _entries(self))
            seen["max_streams"] = max(seen["max_streams"], streams)

    def watch(stage, done, total):
        if stage == "experts" and done == total:
            live["disk"] = _hidden_tensors(shape)
        seen["inputs"].append((stage, done, {(layer, b) for kind, layer, b in _entries(cache) if kind == "input"}))

    with Watched(tmp_path / "acts") as cache:
        disk = _search(path, "sequential", ids, options, cache, watch)
        first = disk.record["layer_order"][0]
    assert disk.choices == memory.choices and disk.record["layer_order"] == memory.record["layer_order"]

    all_inputs = {(layer, b) for layer in moe for b in range(batches)}
    assert all(files == all_inputs for stage, _, files in seen["inputs"] if stage == "experts")  # MoE layers only
    step2 = [files for stage, done, files in seen["inputs"] if stage == "layers" and len(moe) < done < 2 * len(moe)]
    assert step2 and all(files == all_inputs - {(first, b) for b in range(batches)} for files in step2)
    assert seen["max_streams"] == len(moe) * batches  # step 1: one stream per candidate, all on disk at once
    # in memory every cached input is a live tensor; on disk only the last layer's outputs stay
    assert live["memory"] - live["disk"] == len(moe) * batches
    assert live["disk"] == batches
    assert not cache.directory.exists()


def _cli_args(model, out, *extra):
    return ["condense", str(model), "--out", str(out), "--layers", "2", "--experts", "2", "--calib", str(DEMO_CALIB),
            "--samples", "6", "--seq-len", "24", "--batch-size", "4", "--quiet", *extra]


@pytest.mark.parametrize("mode,own_dir", [("sequential", True), ("whole", False)])
def test_cli_condense_with_disk_activations(mode, own_dir, tiny_model_dir, tmp_path, monkeypatch):
    out, acts = tmp_path / "out", tmp_path / "scratch"
    written = set()
    put = DiskActivations.put

    def counting_put(self, key, hidden):
        written.add(self.directory.parent)
        put(self, key, hidden)

    monkeypatch.setattr(DiskActivations, "put", counting_put)
    extra = ["--activations-dir", str(acts)] if own_dir else []
    done = cli.invoke(app, _cli_args(tiny_model_dir, out, "--mode", mode, "--activations", "disk", *extra))
    assert done.exit_code == 0, done.output
    assert written == {acts if own_dir else partial_dir(out)}
    reference = condense(tiny_model_dir, tmp_path / "reference", SearchOptions(layers=2, experts=2, batch_size=4),
                         CalibSpec(str(DEMO_CALIB), samples=6, seq_len=24), show_progress=False, mode=mode)
    record = json.loads((out / "cdmoe.json").read_text())
    assert record["search"]["activations"] == "disk" and reference["search"]["activations"] == "memory"
    assert record["condensed"] == reference["condensed"]
    for key in ("layer_order", "layer_step_scores", "expert_search", "single_layer_scores"):
        assert record["search"][key] == reference["search"][key], key
    assert not partial_dir(out).exists() and not list(out.glob(f"{DIR_PREFIX}*"))
    if own_dir:
        assert list(acts.iterdir()) == []


@pytest.mark.parametrize("extra,message", [(["--activations", "ram"], "unknown --activations 'ram'"),
                                           (["--activations", "memory", "--activations-dir", "x"],
                                            "--activations-dir")])
def test_cli_bad_activations_is_one_line(extra, message, tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    result = cli.invoke(app, _cli_args(tiny_model_dir, out, *extra))
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists() and not partial_dir(out).exists()


def test_resume_drops_a_killed_runs_activation_files(tiny_model_dir, tmp_path):
    """A killed disk run leaves its cache in .OUT.partial/; a resumed run must not ship it in OUT."""
    out = tmp_path / "out"
    calib = CalibSpec(str(DEMO_CALIB), samples=6, seq_len=24)
    ids = load_calibration(load_tokenizer(tiny_model_dir), calib)
    state = SearchState(partial_dir(out) / STATE_DIR,
                        run_key(tiny_model_dir, calib.to_dict(), ids, SearchOptions(layers=2, experts=2, batch_size=4),
                                {"dtype": "torch.float32", "device": "cpu"}))
    state.save_layer_progress(LayerSearchResult())
    stale = DiskActivations(partial_dir(out))
    stale.put(("input", 1, 0), torch.zeros(2, 3))
    done = cli.invoke(app, _cli_args(tiny_model_dir, out, "--mode", "whole"))  # resumed in memory mode
    assert done.exit_code == 0, done.output
    assert "resumed" in json.loads((out / "cdmoe.json").read_text())["search"]
    assert not list(out.glob(f"{DIR_PREFIX}*")) and not partial_dir(out).exists()
