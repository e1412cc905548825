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
    "--quantize int3": (lambda t: ["--quantize", "int3"], "--quantize", "use w8a8 | w4a16 | fp8 | int8 | int4"),
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


# --- issue #28: late failures, bad numbers, ignored options, tokenizer and config files ---------------------------


def _tokenizer_json(text):
    return lambda p: (p / "tokenizer.json").write_text(text)


MORE_BROKEN_MODELS = {
    "config.json a directory": (lambda p: ((p / "config.json").unlink(), (p / "config.json").mkdir()),
                                "config.json is a directory"),
    "no tokenizer files": (lambda p: [f.unlink() for f in p.glob("tokenizer*")], "has no tokenizer files"),
    "tokenizer.json not JSON": (_tokenizer_json("{oops"), "tokenizer.json is not valid JSON"),
    "tokenizer.json without its fields": (_tokenizer_json('{"a": 1}'), "check its tokenizer.json"),
}


@pytest.mark.parametrize("case", list(MORE_BROKEN_MODELS))
def test_a_broken_config_or_tokenizer_is_one_whole_line(tiny_model_dir, tmp_path, case):
    """config.json as a directory ended in IsADirectoryError; tokenizer errors were cut mid-sentence ("from one
    of:") or did not name tokenizer.json (a KeyError traceback for one without 'added_tokens')."""
    damage, message = MORE_BROKEN_MODELS[case]
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    damage(model)
    out = tmp_path / "out"
    result = runner.invoke(app, ["condense", str(model), "--out", str(out), "--layers", "1", *CALIB])
    refused(result, message)
    assert not result.output.rstrip().endswith(":") and "from one of:" not in result.output
    assert not out.exists() and not partial_dir(out).exists()


@pytest.fixture
def no_model_load(monkeypatch):
    import cdmoe.models.loading

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before a precondition was checked")

    monkeypatch.setattr(cdmoe.models.loading.AutoModelForCausalLM, "from_pretrained", no_load)


def _clear_availability_caches():
    from transformers.utils import import_utils

    for name in ("is_peft_available", "is_bitsandbytes_available"):
        getattr(import_utils, name).cache_clear()  # transformers caches what it found installed


@pytest.fixture
def uninstall(monkeypatch):
    """``uninstall(package)``: make it look not installed for the test: not in sys.modules, not found, not
    importable, and not remembered as available by transformers."""
    import importlib.util
    import sys

    def hide(package: str) -> None:
        for name in [m for m in sys.modules if m.split(".")[0] == package]:
            monkeypatch.delitem(sys.modules, name)
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a, **k: None if name.split(".")[0] == package else real(name, *a, **k))

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == package:
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        monkeypatch.setattr(sys, "meta_path", [Blocker(), *sys.meta_path])
        _clear_availability_caches()

    yield hide
    _clear_availability_caches()


@pytest.mark.parametrize("package,args,message", [
    ("bitsandbytes", ["compare", "{model}", "--out", "{out}", "--budget", "0.9", "--methods", "default", *CALIB[:-1]],
     "slim-int8 in --methods needs bitsandbytes"),
    ("bitsandbytes", ["condense", "{model}", "--out", "{out}", "--layers", "1", "--quantize", "int4", *CALIB],
     "--quantize int4 needs bitsandbytes"),
    ("peft", ["finetune", "{condensed}", "--data", str(DEMO_TEXT), "--out", "{out}", "--lora", "--quiet"],
     "--lora needs peft"),
    ("lm_eval", ["eval", "{condensed}", "--tasks", "demo", "--out", "{out}"], "needs lm-eval"),
    ("lm_eval", ["compare", "{model}", "--out", "{out}", "--budget", "0.9", "--methods", "layer-drop",
                 "--tasks", "demo", *CALIB[:-1]], "needs lm-eval"),
])
def test_a_missing_optional_package_is_refused_before_any_work(tiny_model_dir, condensed, tmp_path, uninstall,
                                                               no_model_load, package, args, message):
    """compare --methods default without bitsandbytes computed every other point first; --lora without peft
    failed after loading and left OUT.checkpoints/; lm-eval was looked for after loading. The hint's
    [quant] / [finetune] / [eval] must survive the console (rich markup ate it)."""
    uninstall(package)
    out = tmp_path / "out"
    values = {"model": str(tiny_model_dir), "condensed": str(condensed), "out": str(out)}
    result = runner.invoke(app, [a.format(**values) for a in args])
    refused(result, message)
    extra = {"bitsandbytes": "quant", "peft": "finetune", "lm_eval": "eval"}[package]
    assert f"pip install 'cdmoe[{extra}]'" in result.output
    assert not out.exists() and not partial_dir(out).exists() and not (tmp_path / "out.checkpoints").exists()


def test_brackets_in_a_message_reach_the_terminal():
    from cdmoe.cli.options import _friendly
    from cdmoe.errors import CdmoeError

    @_friendly
    def fails():
        raise CdmoeError("pip install 'cdmoe[quant]' for runs/[bold]x[/bold]")

    import typer

    app_ = typer.Typer()
    app_.command()(fails)
    result = runner.invoke(app_, [])
    assert result.exit_code == 2 and "pip install 'cdmoe[quant]' for runs/[bold]x[/bold]" in result.output


EVAL_TOKENS = {
    "condense": ["condense", "{model}", "--out", "{out}", "--layers", "1", *CALIB],
    "baseline": ["baseline", "layer-drop", "{model}", "--out", "{out}", "--layers", "1", *CALIB[:-1]],
    "compare": ["compare", "{model}", "--out", "{out}", "--budget", "0.9", "--methods", "layer-drop", *CALIB[:-1]],
    "sweep": ["sweep", "{model}", "--out", "{out}", "--layers", "1", *CALIB[:-1]],
    "finetune": ["finetune", "{condensed}", "--data", str(DEMO_TEXT), "--out", "{out}", "--quiet"],
}


@pytest.mark.parametrize("command", list(EVAL_TOKENS))
@pytest.mark.parametrize("tokens", ["-5", "1"])
def test_eval_tokens_is_read_the_same_everywhere(tiny_model_dir, condensed, tmp_path, no_model_load, command, tokens):
    """--eval-tokens -5 scored a truncated first document; one parser for every command: 0 is the whole text,
    a negative count or 1 is refused before any work."""
    out = tmp_path / "out"
    values = {"model": str(tiny_model_dir), "condensed": str(condensed), "out": str(out)}
    args = [a.format(**values) for a in EVAL_TOKENS[command]]
    refused(runner.invoke(app, [*args, "--eval-text", str(DEMO_TEXT), "--eval-tokens", tokens]),
            f"--eval-tokens must be at least 2 (or 0 for the whole text), got {tokens}")
    assert not out.exists()


def test_eval_tokens_0_is_the_whole_text_in_condense_too(tiny_model_dir, tmp_path):
    """condense refused --eval-tokens 0, which compare, sweep, baseline and finetune read as the whole file."""
    from cdmoe.models.loading import load_tokenizer
    from cdmoe.search.calibration import read_documents

    text = tmp_path / "held-out.txt"
    docs = read_documents(DEMO_TEXT)[:20]
    text.write_text("\n\n".join(docs))
    out = tmp_path / "out"
    result = runner.invoke(app, ["condense", str(tiny_model_dir), "--out", str(out), "--layers", "1", *CALIB,
                                 "--eval-text", str(text), "--eval-tokens", "0"])
    assert result.exit_code == 0, result.output
    tokenizer = load_tokenizer(tiny_model_dir)
    whole = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)  # + EOS per document
    assert json.loads((out / "cdmoe.json").read_text())["evaluation"]["tokens"] == whole


@pytest.mark.parametrize("args,message", [
    (["--ppl-seq-len", "100000"], "--ppl-seq-len 100000 exceeds the model's 256 positions"),
    (["--ppl-tokens", "-5"], "--ppl-tokens must be at least 2 (or 0 for the whole text), got -5"),
])
def test_eval_refuses_windows_and_counts_it_cannot_score(tiny_model_dir, tmp_path, no_model_load, args, message):
    """--ppl-seq-len 100000 on a 256-position model wrote a perplexity with exit 0."""
    out = tmp_path / "e.json"
    refused(runner.invoke(app, ["eval", str(tiny_model_dir), "--tasks", "none", "--ppl-text", str(DEMO_TEXT),
                                "--out", str(out), *args]), message)
    assert not out.exists()


@pytest.mark.parametrize("method,args,message", [
    ("layer-drop", ["--layers", "1", "--keep-experts", "3"], "layer-drop does not use --keep-experts"),
    ("expert-drop", ["--keep-experts", "3", "--layers", "1"], "expert-drop does not use --layers"),
    ("slim", ["--quantize", "int8", "--layers", "1"], "slim does not use --layers"),
])
def test_an_option_the_method_does_not_use_is_refused(tiny_model_dir, tmp_path, no_model_load, method, args, message):
    """layer-drop silently ignored --keep-experts."""
    out = tmp_path / "out"
    refused(runner.invoke(app, ["baseline", method, str(tiny_model_dir), "--out", str(out), *CALIB[:-1], *args]),
            message)
    assert not out.exists()


def test_finetune_refuses_a_file_mixing_formats(condensed, tmp_path):
    """A .jsonl of 5 text, 5 instruction and 5 MMLU records trained on the 5 text records and said nothing."""
    data = tmp_path / "mixed.jsonl"
    rows = ([{"text": "the cat sat on the mat " * 20}] * 5
            + [{"instruction": "say ok", "input": "", "output": "ok", "answer": "ok"}] * 5
            + [{"question": "2 + 2?", "choices": ["3", "4"], "answer": 1}] * 5)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ft"
    for extra, message in (([], "record 6 is a commonsense record, record 1 is text"),
                           (["--format", "text"], "record 6 is a commonsense record, --format is text")):
        refused(runner.invoke(app, ["finetune", str(condensed), "--data", str(data), "--out", str(out), "--steps", "1",
                                    "--quiet", *extra]), message)
    assert not out.exists() and not (tmp_path / "ft.checkpoints").exists()
