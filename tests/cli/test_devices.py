"""``--device`` on every command that loads a model: resolved before any work, one line when unusable.

This machine (and CI) has no GPU, so the GPU paths are checked two ways: the resolution logic with
``torch.cuda``'s queries replaced by a fake machine of several GPUs (what ``--device auto | cuda |
cuda:N`` then chooses, and that no GPU's memory is ever added to another's), and the real refusal of
``--device cuda`` on a machine without CUDA, for every command, with nothing written.
"""

import pytest
import torch
from conftest import DEMO_CALIB, DEMO_TEXT
from typer.testing import CliRunner

from cdmoe.cli import app
from cdmoe.errors import CdmoeError
from cdmoe.models import placement
from cdmoe.models.placement import matmul_precision, place, resolve_device, trainer_device

runner = CliRunner()
CALIB, TEXT = str(DEMO_CALIB), str(DEMO_TEXT)

# every command that loads a model, with the arguments that make it otherwise valid
COMMANDS = {
    "condense": lambda m, out: ["condense", m, "--out", out, "--layers", "1", "--calib", CALIB, "--seq-len", "32"],
    "apply": lambda m, out: ["apply", m, f"{m}/config.json", "--out", out],
    "baseline": lambda m, out: ["baseline", "layer-drop", m, "--out", out, "--layers", "1",
                                "--calib", CALIB],
    "compare": lambda m, out: ["compare", m, "--out", out, "--budget", "0.9", "--methods", "layer-drop",
                               "--calib", CALIB, "--eval-text", TEXT],
    "sweep": lambda m, out: ["sweep", m, "--out", out, "--layers", "1", "--calib", CALIB],
    "eval": lambda m, out: ["eval", m, "--tasks", "none", "--ppl-text", TEXT, "--out",
                            f"{out}.json"],
    "finetune": lambda m, out: ["finetune", m, "--data", TEXT, "--out", out, "--steps", "1"],
    "measure": lambda m, out: ["measure", m, m, "--out", f"{out}.json"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_that_loads_a_model_has_a_device_option(command):
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0 and "--device" in result.output, result.output


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_device_cuda_without_a_gpu_is_one_line_and_nothing_is_written(command, tiny_model_dir, tmp_path, monkeypatch):
    assert not torch.cuda.is_available()  # the premise of this test: CI and the build machine have no GPU
    monkeypatch.chdir(tmp_path)  # an eval.json or memory.json would land here
    out = tmp_path / "out"
    result = runner.invoke(app, COMMANDS[command](str(tiny_model_dir), str(out)) + ["--device", "cuda"])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "no CUDA device is available" in message and "--device cpu" in message
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 2  # one (wrapped) line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no partial directory, no result file


def test_unknown_devices_are_refused_by_name():
    for bad, expected in (("tpu", "unknown --device"), ("mps", "unsupported --device"), ("cuda:x", "unknown --device")):
        with pytest.raises(CdmoeError, match=expected):
            resolve_device(bad)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")


@pytest.fixture
def fake_gpus(monkeypatch):
    """A machine with two GPUs of 80 GiB, 70 and 10 GiB free (torch.cuda's queries replaced)."""
    free = {0: 70 * 2**30, 1: 10 * 2**30}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free[i], 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Fake GPU")
    return free


def test_auto_spreads_a_whole_model_over_all_gpus_and_cuda_uses_one(fake_gpus):
    auto = place("auto")
    assert auto.device == torch.device("cuda", 0) and auto.device_map == "auto" and auto.spread
    assert "cuda:0 (Fake GPU, 70.0 GiB free), cuda:1 (Fake GPU, 10.0 GiB free)" in str(auto)
    for name, index in (("cuda", 0), ("cuda:1", 1)):
        one = place(name)
        assert one.device == torch.device("cuda", index) and one.device_map == {"": f"cuda:{index}"} and not one.spread
        assert str(one) == f"cuda:{index} (Fake GPU, {70 if index == 0 else 10}.0 GiB free)"  # that GPU's memory only
    single = place("auto", whole=False)  # sequential mode, fine-tuning: one device
    assert single.device_map == {"": "cuda:0"} and not single.spread
    with pytest.raises(CdmoeError, match=r"has 2 GPU\(s\), cuda:0..cuda:1"):
        resolve_device("cuda:2")


def test_finetuning_refuses_a_gpu_trainer_cannot_use(fake_gpus):
    assert trainer_device("auto") == torch.device("cuda", 0) == trainer_device("cuda")
    with pytest.raises(CdmoeError, match="CUDA_VISIBLE_DEVICES=1"):
        trainer_device("cuda:1")


def test_tf32_is_on_only_for_dtype_tf32_and_restored():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with matmul_precision("tf32"):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    with matmul_precision("fp32"):
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    assert placement.DEVICE_HELP.startswith("auto")
