"""Healing (cdmoe heal, condense --heal): each condensed layer learns the ORIGINAL block on the inputs the
healed model sees; output format, fidelity, whole = sequential, resume, every kind of condensed layer."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DEMO_CALIB, FIXTURES, ROOT, make_tiny
from fidelity_checks import tensors
from transformers import AutoTokenizer
from typer.testing import CliRunner

import cdmoe
from cdmoe.cli import app
from cdmoe.io.output_dir import STATE_DIR, partial_dir
from cdmoe.models.loading import load_model, load_tokenizer
from cdmoe.search.calibration import CalibSpec, load_calibration
from cdmoe.search.heal_state import STATE_FILE

cli = CliRunner()
FAST = {"samples": 40, "steps": 40, "batch_tokens": 256, "eval_every": 10, "patience": 3}  # a few seconds per heal


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def _checkpoint(tmp: Path, family: str, tokenizer_from: Path, **overrides) -> Path:
    """A tiny checkpoint as transformers saves it (per-expert keys), in shards smaller than a layer."""
    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    model = make_tiny(family, seed=11, **{"num_hidden_layers": 5, "vocab_size": len(tok), "bos_token_id": 0,
                                          "eos_token_id": 0, "pad_token_id": 0, **overrides})
    path = tmp / family
    model.save_pretrained(path, max_shard_size="40KB")
    tok.save_pretrained(path)
    return path


def _condensed(tmp: Path, base: Path, layers: int = 2, **kwargs) -> Path:
    out = tmp / f"{base.name}-condensed"
    cdmoe.condense(base, out, layers=layers, calib=str(DEMO_CALIB), samples=10, seq_len=32, mode="whole", **kwargs)
    return out


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("heal")
    base = _checkpoint(tmp, "deepseek_v2", tiny_model_dir)
    return base, _condensed(tmp, base, experts=2)


def _block_inputs(model, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """The inputs (T, H) of decoder layer ``layer``'s MLP block when ``model`` runs on ``ids``."""
    seen = []
    hook = model.model.layers[layer].mlp.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    return torch.cat(seen)


def _formula(weights: dict, prefix: str, x: torch.Tensor, gated_width: int) -> torch.Tensor:
    """Eq. 3's fused SwiGLU, written out from the tensors on disk: down(silu(gate x) * up x * m(x)), m = the
    shared-expert gate sigmoid(w_s x) on the first ``gated_width`` units, 1 elsewhere."""
    h = torch.nn.functional.silu(x @ weights[prefix + "gate_proj.weight"].float().T) \
        * (x @ weights[prefix + "up_proj.weight"].float().T)
    if gated_width:
        h[:, :gated_width] = h[:, :gated_width] * torch.sigmoid(x @ weights[prefix + "shared_gate.weight"].float().T)
    return h @ weights[prefix + "down_proj.weight"].float().T


def _relative(out: torch.Tensor, y: torch.Tensor) -> float:
    return float(((out - y) ** 2).sum() / (y**2).sum())


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen2_moe"])  # qwen2_moe: the gated shared expert
def test_each_layer_learns_the_original_block_on_the_healed_models_inputs(family, tiny_model_dir, tmp_path):
    base = _checkpoint(tmp_path, family, tiny_model_dir)
    condensed = _condensed(tmp_path, base, layers=3, experts=2)
    record = cdmoe.heal(condensed, tmp_path / "healed", mode="whole", **FAST)  # more windows than the search
    heal = record["heal"]
    assert heal["original"] == str(base) and sorted(map(int, heal["layers"])) == [c["layer"] for c in record["condensed"]]
    # independently: the healed model from disk gives each layer's inputs; the target is the original block on them
    healed, original, start = (load_model(p) for p in (tmp_path / "healed", base, condensed))
    cal = heal["calibration"]
    ids = load_calibration(load_tokenizer(base), CalibSpec(cal["source"], cal["samples"], cal["seq_len"], cal["seed"]))
    train = ids[: cal["windows_train"]]
    assert cal["tokens_train"] == train.numel() and cal["windows_val"] == 4
    on_disk = tensors(tmp_path / "healed")
    config = json.loads((tmp_path / "healed" / "config.json").read_text())["cdmoe"]["condensed_layers"]
    for layer, fit in heal["layers"].items():
        x = _block_inputs(healed, int(layer), train)
        with torch.no_grad():
            y = original.model.layers[int(layer)].mlp(x[None])[0]  # the family's own sparse block
            before = _relative(start.model.layers[int(layer)].mlp(x), y)
        after = _relative(_formula(on_disk, f"model.layers.{layer}.mlp.", x, config[layer]["gated_width"]), y)
        assert fit["error_before"]["train"] == pytest.approx(before, rel=1e-4), layer
        assert fit["error_after"]["train"] == pytest.approx(after, rel=1e-4), layer
        assert fit["error_after"]["val"] < fit["error_before"]["val"], layer
    assert all(v["gated_width"] == (48 if family == "qwen2_moe" else 0) for v in config.values())
    assert config == json.loads((condensed / "config.json").read_text())["cdmoe"]["condensed_layers"]


def test_only_the_condensed_mlps_change_and_the_output_loads_without_cdmoe(deepseek, tmp_path):
    base, condensed = deepseek
    out = tmp_path / "healed"
    record = cdmoe.heal(condensed, out, **FAST)
    before, after = tensors(condensed), tensors(out)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    mlps = {f"model.layers.{c['layer']}.mlp.{w}_proj.weight" for c in record["condensed"] for w in ("gate", "up", "down")}
    assert changed == mlps and before.keys() == after.keys()
    assert all(after[k].dtype == before[k].dtype and after[k].shape == before[k].shape for k in before)
    files = sorted(p.name for p in condensed.iterdir() if p.is_file())
    assert files == sorted(p.name for p in out.iterdir() if p.is_file()) and "modeling_cdmoe.py" in files
    for name in files:  # config, code, tokenizer: as they were
        if not name.endswith(".safetensors") and name not in ("cdmoe.json", "README.md"):
            assert (out / name).read_bytes() == (condensed / name).read_bytes(), name
    card = (out / "README.md").read_text()
    assert "## Healing" in card and "weights were then trained" in card
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_model(out)(input_ids=ids).logits
    torch.save((ids, expected), tmp_path / "expected.pt")
    script = f"""
import sys
sys.modules["cdmoe"] = None  # any import of cdmoe fails, as where it is not installed
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
ids, expected = torch.load({str(tmp_path / 'expected.pt')!r})
with torch.no_grad():
    torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
print("OK")
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


def test_whole_and_sequential_heal_to_the_same_bytes(tiny_model_dir, tmp_path):
    # sliding-window layers after layer 2: per-layer attention masks in the sequential capture
    base = _checkpoint(tmp_path, "qwen2_moe", tiny_model_dir, use_sliding_window=True, sliding_window=6,
                       max_window_layers=2)
    condensed = _condensed(tmp_path, base, experts=2)
    records = {mode: cdmoe.heal(condensed, tmp_path / mode, mode=mode, activations="disk" if mode == "sequential"
                                else "memory", **FAST) for mode in ("whole", "sequential")}
    assert [records[m]["heal"]["mode"] for m in records] == ["whole", "sequential"]
    for mode in records:
        for fit in records[mode]["heal"]["layers"].values():
            fit.pop("seconds")
    assert records["sequential"]["heal"]["layers"] == records["whole"]["heal"]["layers"]
    for file in (tmp_path / "whole").glob("*.safetensors"):
        assert file.read_bytes() == (tmp_path / "sequential" / file.name).read_bytes(), file.name


def test_condense_heal_is_condense_then_heal(deepseek, tmp_path):
    base, condensed = deepseek
    args = ["condense", str(base), "--out", str(tmp_path / "both"), "--layers", "2", "--experts", "2", "--calib",
            str(DEMO_CALIB), "--samples", "10", "--seq-len", "32", "--mode", "whole", "--quiet", "--heal-samples", "40"]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    cdmoe.heal(condensed, tmp_path / "after", mode="whole", samples=40)
    a, b = (json.loads((tmp_path / d / "cdmoe.json").read_text())["heal"] for d in ("both", "after"))
    assert [f["error_after"] for f in a["layers"].values()] == [f["error_after"] for f in b["layers"].values()]
    for file in condensed.glob("*.safetensors"):
        assert (tmp_path / "both" / file.name).read_bytes() == (tmp_path / "after" / file.name).read_bytes()


def _heal_cmd(directory: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", "import sys; from cdmoe.cli import app; sys.exit(app())", "heal", str(directory),
            "--out", str(out), "--mode", "sequential", "--device", "cpu", "--steps", "800", "--batch-tokens", "256",
            "--eval-every", "500", "--samples", "40", "--quiet"]


def test_killed_heal_resumes_to_the_same_bytes(deepseek, tmp_path):
    base, condensed = deepseek
    out, reference = tmp_path / "resumed", tmp_path / "uninterrupted"
    state = partial_dir(out) / STATE_DIR / "heal" / STATE_FILE
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"), "TRANSFORMERS_VERBOSITY": "error",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_heal_cmd(condensed, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["layers"]:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert len(json.loads(state.read_text())["layers"]) == 1 and not out.exists()  # killed after one of two layers
    resumed = subprocess.run(_heal_cmd(condensed, out), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    done = cli.invoke(app, _heal_cmd(condensed, reference)[3:])
    assert done.exit_code == 0, done.output
    a, b = (json.loads((d / "cdmoe.json").read_text())["heal"] for d in (out, reference))
    assert a["resumed_layers"] == 1 and "resumed_layers" not in b
    for file in condensed.glob("*.safetensors"):
        assert (out / file.name).read_bytes() == (reference / file.name).read_bytes(), file.name
    assert not partial_dir(out).exists()


def _remote_checkpoint(path: Path, tokenizer_from: Path) -> Path:
    """The DeepSeekMoE-16B stand-in (model_type deepseek, code in the checkpoint) with the tiny tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from cdmoe.models.testing import randomize_

    shutil.copytree(FIXTURES / "remote_deepseek", path)
    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "vocab_size": len(tok), "bos_token_id": 0, "eos_token_id": 0}))
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    randomize_(AutoModelForCausalLM.from_config(config, trust_remote_code=True), seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["shared-only", "remote-code"])
def test_shared_only_and_remote_code_layers_heal(kind, deepseek, tiny_model_dir, tmp_path):
    if kind == "shared-only":
        condensed = _condensed(tmp_path, deepseek[0], shared_only=True)
        trust = {}
    else:
        condensed = _condensed(tmp_path, _remote_checkpoint(tmp_path / "remote", tiny_model_dir),
                               trust_remote_code=True)
        with pytest.raises(cdmoe.CdmoeError, match="--trust-remote-code"):
            cdmoe.heal(condensed, tmp_path / "untrusted", **FAST)
        trust = {"trust_remote_code": True}
    record = cdmoe.heal(condensed, tmp_path / "healed", **FAST, **trust)
    fits = record["heal"]["layers"].values()
    assert all(f["error_after"]["val"] <= f["error_before"]["val"] for f in fits)  # never worse than the start
    assert any(f["error_after"]["val"] < f["error_before"]["val"] for f in fits)  # random tiny models: small gains
    assert (kind == "shared-only") == all(c["experts"] == [] for c in record["condensed"])
    model = load_model(tmp_path / "healed", **trust)
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_bad_heal_input_stops_with_one_line(deepseek, tmp_path):
    base, condensed = deepseek
    out = str(tmp_path / "out")
    cases = [
        ([str(base), "--out", out], "no cdmoe.json"),
        ([str(condensed), "--out", out, "--steps", "0"], "--steps must be at least 1"),
        ([str(condensed), "--out", out, "--val-share", "1.5"], "--val-share"),
        ([str(condensed), "--out", out, "--mode", "sequential", "--eval-text", str(DEMO_CALIB)], "--eval-text needs"),
        ([str(condensed), "--out", out, "--samples", "1"], "at least 2 calibration windows"),
        ([str(condensed), "--out", out, "--original", str(tmp_path / "missing")], "missing"),
        ([str(condensed), "--out", str(condensed)], "--out"),
        ([str(condensed), "--out", out, "--device", "cuda:7"], "--device cuda:7"),
        ([str(condensed), "--out", str(tmp_path / "mine"), "--force"], "--force replaces only directories cdmoe wrote"),
    ]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    for args, message in cases:
        result = cli.invoke(app, ["heal", *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output and not Path(out).exists()
    assert (tmp_path / "mine" / "notes.txt").read_text() == "a user's file"
    layer_drop = tmp_path / "dropped"
    cdmoe.baseline("layer-drop", base, layer_drop, layers=1, calib=str(DEMO_CALIB), samples=4, seq_len=32)
    result = cli.invoke(app, ["heal", str(layer_drop), "--out", out])
    assert result.exit_code == 2 and "layer-drop" in result.output


def test_healing_an_fp8_output_writes_block_quantised_weights_as_measured(tmp_path):
    """An FP8 output's condensed MLPs are block-FP8: healing reads them through Eq. (1), trains, and writes
    them block-quantised afresh (new scales); the errors it reports are those of the weights as saved."""
    from fp8_checks import fp8_checkpoints, literal_dequantize, literal_quantize, tensors_of

    block = (16, 24)
    fp8, _ = fp8_checkpoints(tmp_path, "deepseek_v3", block)
    condensed = _condensed(tmp_path, fp8, experts=2)
    out = tmp_path / "healed"
    record = cdmoe.heal(condensed, out, **FAST)
    before, after = tensors_of(condensed), tensors_of(out)
    changed = {k for k in after if after[k].dtype != before[k].dtype or not torch.equal(
        after[k].view(torch.uint8) if after[k].dtype == torch.float8_e4m3fn else after[k],
        before[k].view(torch.uint8) if before[k].dtype == torch.float8_e4m3fn else before[k])}
    mlps = {f"model.layers.{c['layer']}.mlp.{w}_proj.weight{s}" for c in record["condensed"]
            for w in ("gate", "up", "down") for s in ("", "_scale_inv")}
    assert changed == mlps and before.keys() == after.keys()
    assert all(after[k].dtype == before[k].dtype and after[k].shape == before[k].shape for k in before)
    for name in (k for k in mlps if not k.endswith("_scale_inv")):  # the amax rule's (Q, S) of its own value
        assert after[name].dtype == torch.float8_e4m3fn
        q, s = literal_quantize(literal_dequantize(after[name], after[name + "_scale_inv"], block), block)
        assert torch.equal(q.view(torch.uint8), after[name].view(torch.uint8)) and torch.equal(s, after[name + "_scale_inv"])
    heal = record["heal"]
    cal = heal["calibration"]
    ids = load_calibration(load_tokenizer(fp8), CalibSpec(cal["source"], cal["samples"], cal["seq_len"], cal["seed"]))
    healed, original = load_model(out), load_model(fp8)
    for layer, fit in heal["layers"].items():
        x = _block_inputs(healed, int(layer), ids[: cal["windows_train"]])
        with torch.no_grad():
            y = original.model.layers[int(layer)].mlp(x[None])[0]
            assert fit["error_after"]["train"] == pytest.approx(_relative(healed.model.layers[int(layer)].mlp(x), y),
                                                                 rel=1e-4), layer
        assert fit["error_after"]["val"] < fit["error_before"]["val"], layer


def test_healing_some_layers_heals_them_as_healing_all_does(deepseek, tmp_path):
    """heal_directory(layers=...) (the entry point for any set of condensed layers): the first condensed
    layer sees the same inputs either way, so its weights equal those of healing every layer; the others
    keep the condensed bytes; a layer that is not condensed is refused."""
    from cdmoe.checkpoint.record import read_record
    from cdmoe.methods.heal import HealOptions, heal_directory

    base, condensed = deepseek
    record = read_record(condensed, condensed=True)
    ids = load_calibration(load_tokenizer(base), CalibSpec(str(DEMO_CALIB), 40, 32, 0))
    options = HealOptions(**{k: v for k, v in FAST.items() if k != "samples"})
    first, second = sorted(c["layer"] for c in record["condensed"])
    common = {"mode": "whole", "device": torch.device("cpu"), "dtype": "auto"}
    some = heal_directory(condensed, tmp_path / "some", record, base, ids, {}, options, state_dir=tmp_path / "s1",
                          layers=[first], **common)
    heal_directory(condensed, tmp_path / "all", record, base, ids, {}, options, state_dir=tmp_path / "s2", **common)
    assert list(some["heal"]["layers"]) == [str(first)]
    start, healed_some, healed_all = (tensors(d) for d in (condensed, tmp_path / "some", tmp_path / "all"))
    for name in start:
        if name.startswith(f"model.layers.{first}.mlp."):
            assert torch.equal(healed_some[name], healed_all[name]) and not torch.equal(healed_some[name], start[name])
        else:
            assert torch.equal(healed_some[name], start[name]), name
    with pytest.raises(cdmoe.CdmoeError, match=r"layers \[0\] are not condensed"):
        heal_directory(condensed, tmp_path / "no", record, base, ids, {}, options, state_dir=tmp_path / "s3",
                       layers=[0], **common)
