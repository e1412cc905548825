"""Sequential (larger-than-memory) mode: same selections and output as whole mode; resumable runs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DEMO_CALIB, ROOT, make_tiny
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from cdmoe.cli import app
from cdmoe.io.output_dir import STATE_DIR, partial_dir
from cdmoe.memory.layer_store import SequentialStore
from cdmoe.methods.condense import condense
from cdmoe.models.loading import load_model
from cdmoe.search.calibration import CalibSpec
from cdmoe.search.layer_search import LayerSearchResult
from cdmoe.search.resume import STATE_NAME, SearchState, run_key
from cdmoe.search.run import SearchOptions, run_search

cli = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread; the machine is shared

# family -> overrides; qwen2_moe with sliding-window layers after layer 2 (per-layer attention masks)
FAMILIES = {
    "deepseek_v2": {},
    "qwen2_moe": {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 2},
    "mixtral": {},
    "qwen3_moe": {},
}


def _sharded(tmp: Path, family: str, tokenizer_from: Path | None = None, **overrides) -> Path:
    """A tiny checkpoint saved as transformers saves it (per-expert keys), in shards smaller than one layer."""
    tok = AutoTokenizer.from_pretrained(tokenizer_from) if tokenizer_from else None
    vocab = {"vocab_size": len(tok), "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0} if tok else {}
    model = make_tiny(family, seed=11, **{"num_hidden_layers": 5, **FAMILIES.get(family, {}), **vocab, **overrides})
    path = tmp / family
    model.save_pretrained(path, max_shard_size="40KB")
    if tok is not None:
        tok.save_pretrained(path)
    return path


def _calib(vocab=128, n=6, s=24, seed=0):
    return torch.randint(0, vocab, (n, s), generator=torch.Generator().manual_seed(seed))


def _shards_of_layer(path: Path, layer: int) -> set[str]:
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    return {f for k, f in index.items() if k.startswith(f"model.layers.{layer}.")}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sequential_search_equals_whole(family, tmp_path):
    path = _sharded(tmp_path, family)
    assert len(_shards_of_layer(path, 2)) > 1  # one layer spans several shards
    ids = _calib()
    options = SearchOptions(layers=3, experts=2, batch_size=4)
    whole = run_search(load_model(path), ids, options)
    store = SequentialStore(path)
    if family == "qwen2_moe":
        assert len(set(store.model.config.layer_types)) > 1
    seq = run_search(store.model, ids, options, store=store)
    assert seq.choices == whole.choices
    for key in ("expert_search", "layer_order", "layer_step_scores", "single_layer_scores"):
        assert seq.record[key] == whole.record[key], key  # bit-identical numbers, not just the same choice
    # every decoder layer was released again; only non-layer weights stay in memory
    assert all(p.device.type == "meta" for p in store.layers.parameters())
    assert all(p.device.type == "cpu" for n, p in store.model.named_parameters() if not n.startswith("model.layers."))


def test_each_layer_loads_once_per_algorithm_2_step(tmp_path):
    path = _sharded(tmp_path, "deepseek_v2", num_hidden_layers=7)
    store = SequentialStore(path)
    n = 3
    result = run_search(store.model, _calib(), SearchOptions(layers=n, experts=1, batch_size=3), store=store)
    order, layers, moe = result.record["layer_order"], len(store.layers), sorted(map(int, result.record["expert_search"]))
    remaining, expected = list(moe), layers + len(moe)  # recording pass, then Algorithm 1 once per MoE layer
    for step, best in enumerate(order):
        expected += layers - min(remaining)  # one shared pass over all candidates of the step
        remaining.remove(best)
        if step < n - 1:
            expected += layers - best  # refresh of the inputs behind the chosen layer
    assert store.loads == expected
    per_candidate = sum(layers - c for c in moe) + sum(layers - c for c in moe if c != order[0])
    assert store.loads < layers + len(moe) + per_candidate  # fewer than loading per candidate, already by step 2


def test_layer_store_loads_what_from_pretrained_loads(tmp_path):
    path = _sharded(tmp_path, "deepseek_v2")
    loaded = AutoModelForCausalLM.from_pretrained(path)
    reference = loaded.state_dict()
    store = SequentialStore(path)
    # non-persistent buffer: computed by the module's own __init__, not loaded
    assert torch.equal(store.model.model.rotary_emb.inv_freq, loaded.model.rotary_emb.inv_freq)
    for idx in range(len(store.layers)):
        with store.resident(idx) as layer:
            for name, tensor in layer.state_dict().items():
                assert torch.equal(tensor, reference[f"model.layers.{idx}.{name}"]), name
        assert all(p.device.type == "meta" for p in layer.parameters())
    assert "mlp.experts.gate_up_proj" in dict(store.layers[2].named_parameters())  # fused from per-expert keys on disk
    with safe_open(path / _shards_of_layer(path, 2).pop(), "pt") as f:
        assert not any("gate_up_proj" in k for k in f.keys())


@pytest.mark.parametrize("family,experts", [("deepseek_v2", 2), ("qwen3_moe", 3)])  # qwen3 K*I = I: native format
def test_streamed_output_equals_whole_output(family, experts, tiny_model_dir, tmp_path):
    path = _sharded(tmp_path, family, tokenizer_from=tiny_model_dir)
    outs = {}
    for mode in ("whole", "sequential"):
        outs[mode] = tmp_path / f"out-{mode}"
        condense(path, outs[mode], SearchOptions(layers=2, experts=experts),
                 CalibSpec(str(DEMO_CALIB), samples=6, seq_len=24), show_progress=False, mode=mode)
    records = {m: json.loads((o / "cdmoe.json").read_text()) for m, o in outs.items()}
    assert records["sequential"]["condensed"] == records["whole"]["condensed"]
    assert records["sequential"]["params"] == records["whole"]["params"]
    assert records["sequential"]["native_format"] == (family == "qwen3_moe")
    assert (json.loads((outs["sequential"] / "config.json").read_text())
            == json.loads((outs["whole"] / "config.json").read_text()))
    assert len(list(outs["sequential"].glob("model-*.safetensors"))) == 6  # 5 layers + the rest
    # the same tensors on disk, names included (per-expert keys in the native format)
    on_disk = {}
    for mode, out in outs.items():
        on_disk[mode] = {}
        for file in out.glob("*.safetensors"):
            with safe_open(file, "pt") as f:
                on_disk[mode].update({k: f.get_tensor(k) for k in f.keys()})
    assert on_disk["sequential"].keys() == on_disk["whole"].keys()
    assert all(torch.equal(on_disk["sequential"][k], on_disk["whole"][k]) for k in on_disk["whole"])
    models = {m: AutoModelForCausalLM.from_pretrained(o) for m, o in outs.items()}
    ids = _calib(vocab=models["whole"].config.vocab_size, n=2, s=16)
    with torch.no_grad():
        assert torch.equal(models["sequential"](input_ids=ids).logits, models["whole"](input_ids=ids).logits)


def _condense_cmd(model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from cdmoe.cli import app; sys.exit(app())", "condense", str(model),
            "--out", str(out), "--layers", "3", "--experts", "2", "--calib", str(DEMO_CALIB), "--samples", "24",
            "--seq-len", "64", "--mode", "sequential", "--quiet", *extra]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"), "TRANSFORMERS_VERBOSITY": "error",
            "OMP_NUM_THREADS": "1"}


def test_killed_run_resumes_to_the_same_result(tiny_model_dir, tmp_path):
    path = _sharded(tmp_path, "deepseek_v2", tokenizer_from=tiny_model_dir)
    out, reference = tmp_path / "resumed", tmp_path / "uninterrupted"
    state_file = partial_dir(out) / STATE_DIR / STATE_NAME
    proc = subprocess.Popen(_condense_cmd(path, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if state_file.exists() and json.loads(state_file.read_text())["expert_layers"]:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    finished = json.loads(state_file.read_text())
    assert 1 <= len(finished["expert_layers"]) and not out.exists()  # killed midway, nothing at --out

    resumed = subprocess.run(_condense_cmd(path, out), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr
    done = cli.invoke(app, _condense_cmd(path, reference)[3:])  # the same command, in this process
    assert done.exit_code == 0, done.output

    a, b = (json.loads((d / "cdmoe.json").read_text()) for d in (out, reference))
    assert a["search"]["resumed"]["expert_layers"] >= len(finished["expert_layers"]) and "resumed" not in b["search"]
    assert a["condensed"] == b["condensed"]
    for key in ("layer_order", "layer_step_scores", "expert_search", "single_layer_scores"):
        assert a["search"][key] == b["search"][key], key
    files = sorted(p.name for p in reference.glob("*.safetensors"))
    assert files == sorted(p.name for p in out.glob("*.safetensors")) and len(files) == 6
    for name in files:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert not partial_dir(out).exists() and not (out / STATE_DIR).exists()


def test_mismatched_resume_state_is_refused_then_force_starts_over(tiny_model_dir, tmp_path):
    path = tiny_model_dir
    out = tmp_path / "out"
    calib = CalibSpec(str(DEMO_CALIB), samples=4, seq_len=16)
    from cdmoe.models.loading import load_tokenizer
    from cdmoe.search.calibration import load_calibration

    ids = load_calibration(load_tokenizer(path), calib)
    other = SearchOptions(layers=1, experts=1)  # what the interrupted run was asked
    state = SearchState(partial_dir(out) / STATE_DIR,
                        run_key(path, calib.to_dict(), ids, other, {"dtype": "torch.float32", "device": "cpu"}))
    state.save_layer_progress(LayerSearchResult(order=[3], step_scores=[0.5]))
    args = ["condense", str(path), "--out", str(out), "--layers", "2", "--calib", str(DEMO_CALIB),
            "--samples", "4", "--seq-len", "16", "--quiet"]
    refused = cli.invoke(app, args)
    assert refused.exit_code == 2
    assert "different search" in refused.output and "--force" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and not out.exists()
    assert (partial_dir(out) / STATE_DIR / STATE_NAME).exists()  # the other run's progress is kept

    forced = cli.invoke(app, args + ["--force"])
    assert forced.exit_code == 0, forced.output
    record = json.loads((out / "cdmoe.json").read_text())
    assert "resumed" not in record["search"] and len(record["condensed"]) == 2
    assert not partial_dir(out).exists()


def test_sequential_refuses_eval_text_with_one_line(tiny_model_dir, tmp_path):
    result = cli.invoke(app, ["condense", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--layers", "1",
                              "--calib", str(DEMO_CALIB), "--samples", "2", "--seq-len", "16", "--quiet",
                              "--mode", "sequential", "--eval-text", str(DEMO_CALIB)])
    assert result.exit_code == 2 and "--eval-text" in result.output and not (tmp_path / "o").exists()
    assert not partial_dir(tmp_path / "o").exists()


def test_unknown_mode_and_device(tiny_model_dir, tmp_path):
    base = ["condense", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--layers", "1", "--seq-len", "16", "--quiet"]
    assert "unknown --mode" in cli.invoke(app, base + ["--mode", "lazy"]).output
    res = cli.invoke(app, base + ["--device", "tpu"])
    assert res.exit_code == 2 and "--device" in res.output


def test_plan_memory_counts_a_real_model(tmp_path):
    """What sequential mode holds, counted from the config alone, is a real model's largest layer and
    non-layer weights; ``cdmoe plan`` shows the run's phases and the disk it needs."""
    from conftest import FAMILY_SOURCES

    from cdmoe.models.plan import count
    from cdmoe.models.testing import shrink_config

    config = shrink_config(FAMILY_SOURCES["deepseek_v2"], num_hidden_layers=5)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = make_tiny("deepseek_v2", num_hidden_layers=5)
    per_layer = [sum(t.numel() for t in layer.state_dict().values()) for layer in model.model.layers]
    stored = {k: v for k, v in model.state_dict().items() if not k.startswith("model.layers.")}
    _, params, _ = count(tmp_path / "config.json")
    assert params.largest_layer == max(per_layer)
    assert params.non_layer == sum(v.numel() for v in stored.values())  # embed_tokens, norm, lm_head (untied here)
    assert params.non_layer_tensors == tuple(sorted((v.numel() for v in stored.values()), reverse=True))
    largest = max(model.model.layers, key=lambda layer: sum(t.numel() for t in layer.state_dict().values()))
    assert tuple(sorted((t.numel() for t in largest.state_dict().values()), reverse=True)) in params.layer_tensors
    shown = cli.invoke(app, ["plan", str(tmp_path / "config.json"), "--layers", "1", "--dtype", "float32",
                             "--mode", "sequential", "--activations", "disk"])
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.output.split())
    assert "--mode sequential --activations disk" in text and "algorithm 2: a layer loads" in text