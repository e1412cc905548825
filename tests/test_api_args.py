"""The Python API checks its arguments where they enter (issue #28): a wrong type raises CdmoeError (a ValueError)
naming the function and the argument, before anything is loaded or written; it used to be a TypeError or
AttributeError from deep inside (``'<' not supported between 'str' and 'int'`` in search/run.py)."""

import inspect
import typing

import pytest
import torch
from conftest import DEMO_CALIB

import cdmoe

CALIB = {"calib": str(DEMO_CALIB), "samples": 2, "seq_len": 16}

CASES = {
    "condense layers='2'": (lambda m, o: cdmoe.condense(m, o, layers="2", **CALIB), "condense: layers must be an int"),
    "condense layers=None": (lambda m, o: cdmoe.condense(m, o, layers=None, **CALIB), "layers must be an int"),
    "condense layers=True": (lambda m, o: cdmoe.condense(m, o, layers=True, **CALIB), "layers must be an int"),
    "condense out=None": (lambda m, o: cdmoe.condense(m, None, layers=1, **CALIB), "out must be a path"),
    "condense calib=[...]": (lambda m, o: cdmoe.condense(m, o, layers=1, calib=[str(DEMO_CALIB)]),
                             "calib must be a str"),
    "condense bare nn.Module": (lambda m, o: cdmoe.condense(torch.nn.Linear(2, 2), o, layers=1, **CALIB),
                                "model must be a path (str or pathlib.Path) or a transformers.PreTrainedModel"),
    "condense batch_size='8'": (lambda m, o: cdmoe.condense(m, o, layers=1, batch_size="8", **CALIB),
                                "batch_size must be an int"),
    "compare budgets=0.8": (lambda m, o: cdmoe.compare(m, o, budgets=0.8, **CALIB),
                            "budgets must be a list of numbers"),
    "compare budgets='0.8'": (lambda m, o: cdmoe.compare(m, o, budgets="0.8", **CALIB), "budgets must be a list"),
    "compare methods=[...]": (lambda m, o: cdmoe.compare(m, o, budgets=[0.8], methods=["layer-drop"], **CALIB),
                              "methods must be a str"),
    "evaluate tasks=3": (lambda m, o: cdmoe.evaluate(m, tasks=3, out=o / "e.json"), "evaluate: tasks must be a str"),
    "sweep layers=2": (lambda m, o: cdmoe.sweep(m, o, layers=2, **CALIB), "layers must be a list of ints"),
    "baseline layers='1'": (lambda m, o: cdmoe.baseline("layer-drop", m, o, layers="1", **CALIB),
                            "layers must be an int or None"),
    "plan layers='1'": (lambda m, o: cdmoe.plan(m, layers="1"), "plan: layers must be an int or None"),
    "finetune options={...}": (lambda m, o: cdmoe.finetune(m, o, {"data": "x.txt"}),
                               "options must be a cdmoe.FinetuneOptions"),
    "finetune options.steps='3'": (lambda m, o: cdmoe.finetune(m, o, cdmoe.FinetuneOptions(data="x.txt", steps="3")),
                                   "options.steps must be an int or None"),
    "apply_record record=None": (lambda m, o: cdmoe.apply_record(m, None, o), "record must be a path"),
    "load_model dtype=32": (lambda m, o: cdmoe.load_model(m, dtype=32), "dtype must be a str or None"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_wrong_argument_type_is_one_cdmoe_error_naming_it(tiny_model_dir, tmp_path, monkeypatch, case):
    import cdmoe.models.loading

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cdmoe.models.loading.AutoModelForCausalLM, "from_pretrained", no_load)
    call, message = CASES[case]
    out = tmp_path / "out"
    with pytest.raises(cdmoe.CdmoeError) as caught:
        call(tiny_model_dir, out)
    assert f"cdmoe.{message}" in str(caught.value) or message in str(caught.value), str(caught.value)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_every_exported_function_checks_its_arguments():
    """No exported function is left out: each is wrapped by the one checker, and its annotations resolve."""
    from cdmoe.io.arguments import checked

    wrapped = checked(lambda: None)
    functions = [name for name in cdmoe.__all__ if inspect.isfunction(getattr(cdmoe, name))
                 and name != "trust_remote_code"]
    assert {"condense", "evaluate", "compare", "sweep", "baseline", "finetune", "plan", "apply_record",
            "condense_layers", "save", "load_model"} <= set(functions)
    for name in functions:
        fn = getattr(cdmoe, name)
        assert fn.__code__ is wrapped.__code__, f"cdmoe.{name} is not checked"
        typing.get_type_hints(fn.__wrapped__)  # raises if an annotation does not resolve


@pytest.mark.parametrize("value,hint,ok", [
    (3, int, True), (True, int, False), (3, float, True), (False, float, False), (2.5, int, False),
    ((0.8, 0.6), list[float], True), ([1, "2"], list[int], False), ((1, 2), tuple[int, ...], True),
    ("a/b", "path", True), (None, "path", False), (None, "optional int", True), ("x", "optional int", False),
])
def test_the_checker_reads_annotations_as_python_does(value, hint, ok):
    from pathlib import Path

    from cdmoe.io.arguments import type_problem

    hint = {"path": str | Path, "optional int": int | None}.get(hint, hint) if isinstance(hint, str) else hint
    assert (type_problem("x", value, hint) is None) == ok
