"""The budget planner: its choices against the literal algorithm (a full model pass per candidate), the budget as
a ceiling (predicted vs written bytes), sequential == whole, and a killed run resuming to the same bytes."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DEMO_CALIB, ROOT, make_tiny
from fidelity_checks import digest, expected_untouched, tensors
from naive_reference import naive_budget_plan
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from cdmoe.cli import app
from cdmoe.io.output_dir import STATE_DIR, partial_dir
from cdmoe.methods.apply import apply_record
from cdmoe.methods.budget_plan import condense_budget, reap_saliency
from cdmoe.models.byte_budget import ByteTable
from cdmoe.models.storage_dtypes import storage_plan
from cdmoe.search.calibration import CalibSpec
from cdmoe.search.plan_run import PlanOptions, run_plan
from cdmoe.search.resume import STATE_NAME

cli = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread; the machine is shared


@pytest.mark.parametrize("name,overrides", [("deepseek_v2", {}), ("mixtral", {"num_hidden_layers": 4})])
def test_planner_chooses_what_the_literal_algorithm_chooses(name, overrides):
    # deepseek_v2: shared experts (condense down to K = 0); mixtral: none (K >= 1)
    model = make_tiny(name, seed=3, **{"num_hidden_layers": 5, **overrides})
    ids = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    table = ByteTable(model, storage_plan(model, None, torch.float32))
    original = table.total({})
    budgets = (0.75, 0.5)
    result = run_plan(model, ids, PlanOptions(budgets=budgets, batch_size=4), table, original, reap_saliency)
    ladders = {int(k): v for k, v in result.record["ladders"].items()}
    for ratio in budgets:
        expected = naive_budget_plan(model, ids, ladders, table.fixed, int(ratio * original))
        got = result.steps[ratio]
        assert [(s["layer"], s["rung"]) for s in got] == [(layer, rung) for layer, rung, _ in expected]
        torch.testing.assert_close(torch.tensor([s["divergence"] for s in got], dtype=torch.float64),
                                   torch.tensor([js for *_, js in expected], dtype=torch.float64), rtol=1e-4, atol=1e-7)
        assert result.predicted[ratio] <= int(ratio * original) < table.total({})
        kinds = {a.kind for a in result.plans[ratio].values()}
        assert len(got) >= 3
    assert kinds - {"keep"}, kinds  # the small budget needs more than one kind of action or several layers
    all_kinds = {s["action"].split("-")[0] for ratio in budgets for s in result.steps[ratio]}
    assert {"prune", "condense"} <= all_kinds  # both branches of the ladders were taken somewhere


def _checkpoint(tmp: Path, name: str, tokenizer_dir: Path, dtype=torch.bfloat16, **overrides) -> Path:
    """A tiny checkpoint as transformers saves it (per-expert keys, shards smaller than a layer), in ``dtype``
    (deepseek_v3 keeps its routers in fp32), with the shared test tokenizer."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = make_tiny(name, seed=11, dtype=dtype, num_hidden_layers=5, vocab_size=len(tok), bos_token_id=0,
                      eos_token_id=0, pad_token_id=0, **overrides)
    path = tmp / name
    model.save_pretrained(path, max_shard_size="40KB")
    tok.save_pretrained(path)
    return path


def _tensor_bytes(directory: Path) -> tuple[int, int]:
    """(bytes of the tensors, bytes of the files) of a directory's safetensors, from the files' own headers."""
    tensors = files = 0
    for file in directory.glob("*.safetensors"):
        raw = file.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8 : 8 + n])
        tensors += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
        files += len(raw)
    return tensors, files


def test_budget_is_a_ceiling_and_sequential_equals_whole(tiny_model_dir, tmp_path):
    # glm4_moe: bf16 weights with fp32 routers, group-limited routing (pruned per group), a shared expert
    path = _checkpoint(tmp_path, "glm4_moe", tiny_model_dir, n_group=2, topk_group=1)
    original = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    calib = CalibSpec(str(DEMO_CALIB), samples=6, seq_len=24)
    outs, records = {}, {}
    for mode in ("whole", "sequential"):
        outs[mode] = tmp_path / mode
        records[mode] = condense_budget(path, outs[mode], PlanOptions(budgets=(0.55,)), calib, show_progress=False,
                                        mode=mode)
    for mode, out in outs.items():
        budget = records[mode]["budget"]
        tensor_total, files = _tensor_bytes(out)
        assert budget["original_bytes"] == original and budget["budget_bytes"] == int(0.55 * original)
        assert tensor_total == budget["predicted_tensor_bytes"]  # tensor bytes exactly as predicted
        assert files == budget["written_bytes"] <= budget["predicted_bytes"] <= budget["budget_bytes"]
    whole, seq = records["whole"], records["sequential"]
    assert whole["layers"] == seq["layers"] and whole["steps"] == seq["steps"]
    assert whole["search"]["candidates"] == seq["search"]["candidates"]  # bit-identical scores
    assert {a["action"] for a in whole["layers"].values()} >= {"prune", "condense"}
    for pruned in whole["pruned"]:  # group-limited routing: as many experts kept in each group of 4
        assert [sum(e // 4 == g for e in pruned["experts"]) for g in (0, 1)] in ([3, 3], [2, 2])
    assert whole["search"]["prune_notes"] and not whole["native_format"]
    a, b = tensors(outs["whole"]), tensors(outs["sequential"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {str(t.dtype) for k, t in a.items() if k.endswith("gate.weight")} == {"torch.float32"}  # routers stay fp32
    source = tensors(path)  # untouched tensors: the source's bytes; a pruned layer's: the source's kept rows
    changed = {int(layer) for layer, action in whole["layers"].items() if action["action"] != "keep"}
    for name, tensor in expected_untouched(source, changed).items():
        assert digest(a[name]) == digest(tensor), name
    for pruned in whole["pruned"]:
        ids = torch.tensor(pruned["experts"])
        for name, tensor in expected_untouched(source, set()).items():
            if name.startswith(f"model.layers.{pruned['layer']}.mlp."):
                assert digest(a[name]) == digest(tensor if ".shared_experts." in name else tensor[ids]), name
    outs["applied"] = apply_record(path, outs["whole"], tmp_path / "applied")  # cdmoe apply replays every action
    applied = tensors(outs["applied"])
    assert applied.keys() == a.keys() and all(torch.equal(applied[k], a[k]) for k in a)
    ids = torch.randint(0, 300, (2, 16))
    models = {m: AutoModelForCausalLM.from_pretrained(o, attn_implementation="eager").eval() for m, o in outs.items()}
    with torch.no_grad():
        logits = {m: model(input_ids=ids).logits for m, model in models.items()}
    assert torch.equal(logits["whole"], logits["sequential"]) and torch.equal(logits["whole"], logits["applied"])


def _budget_cmd(model: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", "import sys; from cdmoe.cli import app; sys.exit(app())", "condense", str(model),
            "--out", str(out), "--budget", "0.5", "--calib", str(DEMO_CALIB), "--samples", "24", "--seq-len", "64",
            "--mode", "sequential", "--quiet"]


def test_killed_run_resumes_to_the_same_bytes(tiny_model_dir, tmp_path):
    path = _checkpoint(tmp_path, "deepseek_v2", tiny_model_dir, dtype=torch.float32)
    out, reference = tmp_path / "resumed", tmp_path / "uninterrupted"
    state_file = partial_dir(out) / STATE_DIR / STATE_NAME
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"), "TRANSFORMERS_VERBOSITY": "error",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_budget_cmd(path, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if state_file.exists():
            planner = json.loads(state_file.read_text()).get("planner") or {}
            if len(planner.get("steps", [])) >= 3:  # killed after steps at layers with MoE layers behind them
                break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    killed = json.loads(state_file.read_text())
    assert min(s["layer"] for s in killed["planner"]["steps"]) < 4 and not out.exists()

    resumed = subprocess.run(_budget_cmd(path, out), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr
    done = cli.invoke(app, _budget_cmd(path, reference)[3:])
    assert done.exit_code == 0, done.output
    a, b = (json.loads((d / "cdmoe.json").read_text()) for d in (out, reference))
    assert a["search"]["resumed"]["plan_steps"] >= len(killed["planner"]["steps"]) and "resumed" not in b["search"]
    assert a["layers"] == b["layers"] and a["steps"] == b["steps"]
    files = sorted(p.name for p in reference.glob("*.safetensors"))
    assert files == sorted(p.name for p in out.glob("*.safetensors")) and len(files) == 6
    for name in files:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert not partial_dir(out).exists()


def test_budget_options_are_refused_in_one_line(tiny_model_dir, tmp_path, monkeypatch):
    base = ["condense", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--calib", str(DEMO_CALIB),
            "--samples", "2", "--seq-len", "16", "--quiet"]
    for extra, words in ((["--layers", "2", "--budget", "0.6"], "not both"), ([], "--budget"),
                         (["--budget", "0.6", "--experts", "2"], "--experts"), (["--budget", "1.5"], "(0, 1]"),
                         (["--budget", "0.05"], "below what any plan reaches"),
                         (["--budget", "0.6", "--quantize", "int4"], "use --quantize w8a8 | w4a16 | fp8")):
        result = cli.invoke(app, base + extra)
        assert result.exit_code == 2 and words in result.output, (extra, result.output)
        assert len(result.output.strip().splitlines()) <= 3 and "Traceback" not in result.output
        assert not (tmp_path / "o").exists() and not partial_dir(tmp_path / "o").exists()
    monkeypatch.setattr("cdmoe.search.plan_run.calibrate", lambda *a, **k: pytest.fail("calibrated first"))
    assert cli.invoke(app, base + ["--budget", "0.05"]).exit_code == 2  # refused before the calibration pass


def test_plan_budget_shows_bytes(tiny_model_dir):
    result = cli.invoke(app, ["plan", str(tiny_model_dir), "--budget", "0.8,0.6", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    original = sum(f.stat().st_size for f in tiny_model_dir.glob("*.safetensors"))
    assert data["measured"] and data["original_bytes"] == original
    assert data["budgets"]["0.6"]["budget_bytes"] == int(0.6 * original)
    layer = next(iter(data["layers"].values()))["actions"]
    assert list(layer)[:2] == ["keep", "prune-6"] and layer["drop"] == 0
    assert layer["keep"] > layer["prune-6"] > layer["prune-4"] and layer["condense-2"] > layer["condense-0"] > 0
    # keep is every stored tensor of one MoE block (fp32) plus its header bound
    assert data["fixed_bytes"] + len(data["layers"]) * layer["keep"] >= original
    result = cli.invoke(app, ["plan", str(tiny_model_dir), "--budget", "0.6", "--quantize", "w8a8", "--json"])
    assert result.exit_code == 0, result.output
    quantised = json.loads(result.output)  # the budget still a ratio of the original bytes; actions in int8 bytes
    assert quantised["original_bytes"] == original and quantised["quantize"] == "w8a8"
    assert quantised["fixed_bytes"] < data["fixed_bytes"] and quantised["floor_bytes"] < data["floor_bytes"]
    q_layer = next(iter(quantised["layers"].values()))["actions"]
    assert 0.25 < q_layer["keep"] / layer["keep"] < 0.35  # fp32 experts to int8 codes + fp32 row scales


def test_a_block_fp8_source_is_refused_before_any_work(tmp_path, monkeypatch):
    """The planner renumbers a pruned layer's experts, which the FP8 writer would re-quantise: refused in one
    line by condense --budget and by compare's budget method, before the calibration pass; --layers takes it."""
    from fp8_checks import fp8_checkpoints

    fp8, _ = fp8_checkpoints(tmp_path, "qwen3_moe", (16, 16))
    monkeypatch.setattr("cdmoe.search.calibration.load_calibration", lambda *a, **k: pytest.fail("calibrated"))
    monkeypatch.setattr("cdmoe.methods.session.load_calibration", lambda *a, **k: pytest.fail("calibrated"))
    monkeypatch.setattr("cdmoe.comparison.compare.load_calibration", lambda *a, **k: pytest.fail("calibrated"))
    common = ["--out", str(tmp_path / "o"), "--calib", str(DEMO_CALIB), "--samples", "2", "--seq-len", "16"]
    for args in (["condense", str(fp8), "--budget", "0.6", "--quiet"],
                 ["compare", str(fp8), "--budget", "0.6", "--methods", "budget,expert-drop"]):
        result = cli.invoke(app, args + common)
        assert result.exit_code == 2 and "block-FP8 checkpoint, which the budget planner" in result.output, result.output
        assert len(result.output.strip().splitlines()) <= 3 and "Traceback" not in result.output
        assert not (tmp_path / "o").exists() and not partial_dir(tmp_path / "o").exists()


def test_budget_heal_heals_the_plans_condensed_layers_as_cdmoe_heal_does(tiny_model_dir, tmp_path):
    """condense --budget --heal == condense --budget, then cdmoe heal (same windows, same options): the same
    bytes; only the condensed MLPs differ from the unhealed plan (pruned and kept layers bit-identical)."""
    import cdmoe
    from cdmoe.search.heal_fit import HealOptions

    path = _checkpoint(tmp_path, "deepseek_v2", tiny_model_dir, dtype=torch.float32)
    calib = CalibSpec(str(DEMO_CALIB), 16, 64, 0)
    plain = condense_budget(path, tmp_path / "plain", PlanOptions(budgets=(0.7,)), calib, show_progress=False,
                            mode="whole")
    actions = {v["action"] for v in plain["layers"].values()}
    assert "condense" in actions and actions & {"prune", "keep"}  # a mix: healing must leave the rest alone
    healed = condense_budget(path, tmp_path / "healed", PlanOptions(budgets=(0.7,)), calib, show_progress=False,
                             mode="whole", heal=HealOptions(steps=20, eval_every=5))
    assert sorted(healed["heal"]["layers"], key=int) == [str(c["layer"]) for c in plain["condensed"]]
    cdmoe.heal(tmp_path / "plain", tmp_path / "after", steps=20, eval_every=5)
    a, b, p = (tensors(tmp_path / d) for d in ("healed", "after", "plain"))
    assert a.keys() == b.keys() == p.keys() and all(torch.equal(a[k], b[k]) for k in a)
    changed = {k for k in a if not torch.equal(a[k], p[k])}
    mlps = {f"model.layers.{c['layer']}.mlp.{w}_proj.weight" for c in plain["condensed"] for w in ("gate", "up", "down")}
    assert changed == mlps


@pytest.mark.parametrize("scheme", ["w8a8", "w4a16"])
def test_budget_with_quantize_is_the_plan_quantised_within_its_own_bytes(tiny_model_dir, tmp_path, scheme):
    """condense --budget R --quantize SCHEME: the plan is made in the quantised output's bytes (exact tensor bytes,
    under the budget, a plan that would not fit unquantised), sequential mode writes whole mode's tensors, and
    its output is the plan's model quantised:
    plain transformers loads it with the logits of the in-memory plan fake-quantised (compressed-tensors),
    and cdmoe apply replays plan and scheme to the same bytes."""
    from cdmoe.methods.compressed import prepare_quantized
    from cdmoe.models.loading import load_model, round_to_checkpoint_dtype
    from cdmoe.models.mixed import LayerAction, apply_plan
    from cdmoe.models.storage_dtypes import cast_to_storage

    path = _checkpoint(tmp_path, "glm4_moe", tiny_model_dir, n_group=2, topk_group=1)
    calib, out = CalibSpec(str(DEMO_CALIB), samples=6, seq_len=24), tmp_path / scheme
    record = condense_budget(path, out, PlanOptions(budgets=(0.45,)), calib, show_progress=False, mode="whole",
                             quantize=scheme)
    sequential = condense_budget(path, tmp_path / "seq", PlanOptions(budgets=(0.45,)), calib, show_progress=False,
                                 mode="sequential", quantize=scheme)  # layer by layer: the same tensors
    a, b = tensors(out), tensors(tmp_path / "seq")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert sequential["quantization"] == record["quantization"] and sequential["layers"] == record["layers"]
    assert json.loads((out / "config.json").read_text()) == json.loads((tmp_path / "seq" / "config.json").read_text())
    budget = record["budget"]
    tensor_total, files = _tensor_bytes(out)
    assert tensor_total == budget["predicted_tensor_bytes"] and budget["quantize"] == scheme
    assert f"with compressed-tensors, scheme {scheme}" in (out / "README.md").read_text()  # the model card
    assert files == budget["written_bytes"] <= budget["predicted_bytes"] <= budget["budget_bytes"]
    plan = {int(layer): LayerAction.from_dict(a) for layer, a in record["layers"].items()}
    assert {a.kind for a in plan.values()} >= {"prune", "condense"}, record["layers"]
    model = load_model(path)
    storage = round_to_checkpoint_dtype(model, path, "auto")
    assert ByteTable(model, storage).total(plan) > budget["budget_bytes"]  # fits only once quantised
    apply_plan(model, plan)
    cast_to_storage(model, storage)  # the stored values are what is quantised
    group = record["quantization"]["weights"]["group_size"]
    expected_model = prepare_quantized(model.float(), scheme, torch.float32, group=group)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = expected_model(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    replayed = tensors(apply_record(path, out, tmp_path / "applied"))
    written = tensors(out)
    assert replayed.keys() == written.keys() and all(torch.equal(replayed[k], written[k]) for k in written)


def test_budget_heal_quantize_is_the_healed_plan_quantised(tiny_model_dir, tmp_path):
    """condense --budget R --heal --quantize w8a8 (whole, and layer by layer) == its plan replayed unquantised by
    cdmoe apply, healed by cdmoe heal, then quantised by cdmoe baseline slim --quantize w8a8: the same tensors."""
    import cdmoe
    from cdmoe.methods.baselines import BaselineOptions, run_baseline
    from cdmoe.search.heal_fit import HealOptions

    path = _checkpoint(tmp_path, "deepseek_v2", tiny_model_dir, dtype=torch.float32)
    calib, heal = CalibSpec(str(DEMO_CALIB), 16, 64, 0), HealOptions(steps=10, eval_every=5)
    records = {mode: condense_budget(path, tmp_path / mode, PlanOptions(budgets=(0.3,)), calib, show_progress=False,
                                     mode=mode, heal=heal, quantize="w8a8") for mode in ("whole", "sequential")}
    record = records["whole"]
    assert record["condensed"] and record["heal"]["layers"], record["layers"]  # condensed layers were healed
    assert records["sequential"]["layers"] == record["layers"] and record["budget"]["quantize"] == "w8a8"
    plan = {k: v for k, v in record.items() if k not in ("quantization", "heal")}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    apply_record(path, tmp_path / "plan.json", tmp_path / "applied")
    cdmoe.heal(tmp_path / "applied", tmp_path / "healed", steps=10, eval_every=5)
    run_baseline(tmp_path / "healed", tmp_path / "slim", BaselineOptions("slim", quantize="w8a8"))
    expected = tensors(tmp_path / "slim")
    for mode, rec in records.items():
        got = tensors(tmp_path / mode)
        assert got.keys() == expected.keys(), (mode, set(got) ^ set(expected))
        assert all(torch.equal(got[k], expected[k]) for k in got), mode
        assert rec["quantization"]["scheme"] == "w8a8" and rec["heal"]["layers"].keys() == record["heal"]["layers"].keys()
        assert rec["budget"]["written_bytes"] <= rec["budget"]["budget_bytes"]
        assert not (tmp_path / mode / ".quantised").exists()
        card = (tmp_path / mode / "README.md").read_text()  # the model card says what was done
        assert "with compressed-tensors, scheme w8a8" in card and "## Healing" in card, card
