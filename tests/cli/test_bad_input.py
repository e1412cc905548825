"""Bad input is refused before any work: one line naming the problem and the fix, exit 2, no
traceback, nothing written (issue #15 point 7, #19 points 7-9). The list of cases is the spec."""

import json
import shutil

import pytest
from conftest import DEMO_CALIB, DEMO_TEXT
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cdmoe.cli import app
from cdmoe.io.output_dir import partial_dir

runner = CliRunner()
CALIB = ["--calib", str(DEMO_CALIB), "--samples", "4", "--seq-len", "16", "--quiet"]


def _config(edit):
    def change(path):
        data = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(edit(data)))
    return change


def _tensors(edit):
    def change(path):
        tensors = load_file(path / "model.safetensors")
        edit(tensors)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return change


O_PROJ = "model.layers.1.self_attn.o_proj.weight"
BROKEN_MODELS = {
    "no config.json": (lambda p: (p / "config.json").unlink(), "has no config.json"),
    "config not JSON": (lambda p: (p / "config.json").write_text("{oops"), "is not valid JSON"),
    "config a JSON list": (lambda p: (p / "config.json").write_text("[1, 2]"), "holds a JSON list"),
    "config lacks the expert count": (_config(lambda c: {k: v for k, v in c.items() if k != "n_routed_experts"}),
                                      "lacks 'n_routed_experts"),
    "config lacks hidden_size": (_config(lambda c: {k: v for k, v in c.items() if k != "hidden_size"}),
                                 "lacks 'hidden_size'"),
    "empty safetensors": (lambda p: (p / "model.safetensors").write_bytes(b""), "is empty"),
    "truncated safetensors": (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-100]),
                              "is truncated"),
    "corrupt safetensors header": (lambda p: (p / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"x" * 200),
                                   "corrupt safetensors header"),
    "a tensor missing": (_tensors(lambda t: t.pop(O_PROJ)), f"has no tensor for {O_PROJ}"),
    "a tensor of the wrong shape": (_tensors(lambda t: t.__setitem__(O_PROJ, t[O_PROJ][:, :10].clone())),
                                    f"tensor {O_PROJ} has shape"),
    "pickle weights only": (lambda p: (p / "model.safetensors").rename(p / "pytorch_model.bin"), "pickle weights"),
}


def refused(result, message):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if "Loading weights" not in line]
    assert len(lines) == 1 and message in lines[0], result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("case", list(BROKEN_MODELS))
def test_a_broken_model_directory_is_refused_before_any_work(tiny_model_dir, tmp_path, case):
    damage, message = BROKEN_MODELS[case]
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    damage(model)
    out = tmp_path / "out"
    refused(runner.invoke(app, ["condense", str(model), "--out", str(out), "--layers", "1", *CALIB]), message)
    assert not out.exists() and not partial_dir(out).exists()
    if case.startswith("config"):  # plan reads the config alone
        refused(runner.invoke(app, ["plan", str(model), "--layers", "1"]), message)


@pytest.fixture(scope="module")
def bad_texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (root / "latin1.txt").write_bytes("café crème brûlée ".encode("latin-1") * 50)
    (root / "fake.txt.gz").write_text("not compressed\n\n" * 50)
    return root


CONDENSE_OPTIONS = {
    "--calib binary": (lambda t: ["--calib", str(t / "binary.txt")], "--calib", "is binary"),
    "--calib not UTF-8": (lambda t: ["--calib", str(t / "latin1.txt")], "--calib", "is not UTF-8"),
    "--calib falsely .gz": (lambda t: ["--calib", str(t / "fake.txt.gz")], "--calib", "is not gzip"),
    "--eval-text missing": (lambda t: ["--eval-text", str(t / "none.txt")], "--eval-text", "does not exist"),
    "--eval-text binary": (lambda t: ["--eval-text", str(t / "binary.txt")], "--eval-text", "is binary"),
    "--batch-size 0": (lambda t: ["--batch-size", "0"], "--batch-size", "at least 1"),
    "--seq-len past the positions": (lambda t: ["--seq-len", "100000"], "--seq-len", "max_position_embeddings"),
    "--samples 0": (lambda t: ["--samples", "0"], "--samples", "at least 1"),
    "--experts -1": (lambda t: ["--experts", "-1"], "--experts", "0 (shared experts only) or more"),
    "--quantize int3": (lambda t: ["--quantize", "int3"], "--quantize", "use int8 or int4"),
    "--dtype foo": (lambda t: ["--dtype", "foo"], "dtype", "unknown dtype"),
}


@pytest.mark.parametrize("case", list(CONDENSE_OPTIONS))
def test_a_bad_option_is_refused_before_loading_the_model(tiny_model_dir, tmp_path, bad_texts, monkeypatch, case):
    import cdmoe.models.loading

    args, option, message = CONDENSE_OPTIONS[case]

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the option was checked")

    monkeypatch.setattr(cdmoe.models.loading.AutoModelForCausalLM, "from_pretrained", no_load)
    out = tmp_path / "out"
    result = runner.invoke(app, ["condense", str(tiny_model_dir), "--out", str(out), "--layers", "1", *CALIB,
                                 *args(bad_texts)])
    refused(result, message)
    assert option in result.output
    assert not out.exists() and not partial_dir(out).exists()


@pytest.mark.parametrize("args,message", [
    (["--layers", "0"], "--layers 0 is out of range"),
    (["--layers", "1", "--dtype", "foo"], "unknown dtype 'foo'"),
])
def test_plan_refuses_what_it_used_to_accept(tiny_model_dir, args, message):
    refused(runner.invoke(app, ["plan", str(tiny_model_dir), *args]), message)


@pytest.mark.parametrize("args,message", [
    (["--batch-size", "abc"], "--batch-size takes a positive integer or auto"),
    (["--ppl-seq-len", "0"], "--ppl-seq-len must be at least 2"),
])
def test_eval_refuses_bad_numbers(tiny_model_dir, tmp_path, args, message):
    result = runner.invoke(app, ["eval", str(tiny_model_dir), "--tasks", "none", "--ppl-text", str(DEMO_TEXT),
                                 "--out", str(tmp_path / "e.json"), *args])
    refused(result, message)
    assert not (tmp_path / "e.json").exists()


def test_measure_on_a_missing_path_says_so(tiny_model_dir, tmp_path):
    refused(runner.invoke(app, ["measure", str(tmp_path / "nope"), str(tiny_model_dir), "--out", str(tmp_path / "m.json")]),
            "does not exist")


@pytest.fixture(scope="module")
def condensed(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("condensed") / "out"
    assert runner.invoke(app, ["condense", str(tiny_model_dir), "--out", str(out), "--layers", "1", *CALIB]).exit_code == 0
    return out


def _record(condensed, tmp_path, edit):
    record = json.loads((condensed / "cdmoe.json").read_text())
    path = tmp_path / "record.json"
    path.write_text(edit(record))
    return path


def _gates(value):
    def edit(record):
        record["condensed"][0]["gates"] = [value] * len(record["condensed"][0]["gates"])
        return json.dumps(record)
    return edit


def _expert(record):
    record["condensed"][0]["experts"][0] = 99
    return json.dumps(record)


RECORDS = {
    "NaN gates": (_gates(float("nan")), "gates must be finite"),
    "an expert id the model lacks": (_expert, "ids 0..7 (a record made for another model?)"),
    "not JSON": (lambda r: "{nope", "is not valid JSON"),
    "no 'condensed' list": (lambda r: json.dumps({k: v for k, v in r.items() if k != "condensed"}),
                            "has no 'condensed' list"),
}


@pytest.mark.parametrize("case", list(RECORDS))
def test_apply_checks_the_record(tiny_model_dir, condensed, tmp_path, case):
    edit, message = RECORDS[case]
    out = tmp_path / "out"
    refused(runner.invoke(app, ["apply", str(tiny_model_dir), str(_record(condensed, tmp_path, edit)), "--out", str(out)]),
            message)
    assert not out.exists()


def test_apply_refuses_a_record_made_for_another_model(condensed, tmp_path):
    from conftest import make_tiny, tiny_tokenizer

    other = tmp_path / "other"
    make_tiny("qwen2_moe", vocab_size=320).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    refused(runner.invoke(app, ["apply", str(other), str(condensed), "--out", str(tmp_path / "out")]),
            "the record was made for a 'deepseek_v2' model")


def test_report_refuses_a_file_as_out_and_a_broken_record(condensed, tmp_path):
    (tmp_path / "afile").write_text("x")
    refused(runner.invoke(app, ["report", str(condensed), "--out", str(tmp_path / "afile")]), "is a file")
    broken = tmp_path / "broken"
    shutil.copytree(condensed, broken)
    (broken / "cdmoe.json").write_text("{x")
    refused(runner.invoke(app, ["report", str(broken), "--out", str(tmp_path / "rep")]), "is not valid JSON")


def test_finetune_refuses_negative_steps(condensed, tmp_path):
    result = runner.invoke(app, ["finetune", str(condensed), "--data", str(DEMO_TEXT), "--out", str(tmp_path / "ft"),
                                 "--steps", "-3"])
    refused(result, "--steps must be at least 1")
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("content", ["{not json", "[1, 2, 3]", '{"key_hash": 5}'])
def test_a_corrupt_resume_state_is_refused_then_force_starts_over(tiny_model_dir, tmp_path, content):
    out = tmp_path / "out"
    state = partial_dir(out) / "state"
    state.mkdir(parents=True)
    (state / "state.json").write_text(content)
    refused(runner.invoke(app, ["condense", str(tiny_model_dir), "--out", str(out), "--layers", "1", *CALIB]),
            "is corrupt")
    result = runner.invoke(app, ["condense", str(tiny_model_dir), "--out", str(out), "--layers", "1", *CALIB, "--force"])
    assert result.exit_code == 0, result.output
