"""The per-layer trainer of healing: errors measured on the weights it keeps, early stopping, relative steps."""

import copy

import pytest
import torch

from cdmoe.errors import CdmoeError
from cdmoe.models.modeling_cdmoe import CondensedMLP
from cdmoe.search.heal_fit import HealOptions, fit_layer

H, I = 16, 24


def _mlp(seed: int, gated: int = 0) -> CondensedMLP:
    torch.manual_seed(seed)
    mlp = CondensedMLP(H, I, "silu", gated_width=gated)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return mlp.eval()


def _direct_error(mlp, x, y) -> float:
    """||f(X) - Y||_F^2 / ||Y||_F^2 from the explicit SwiGLU formula (not the module's forward)."""
    with torch.no_grad():
        h = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
        if mlp.shared_gate is not None:
            w = mlp.gated_width
            h[:, :w] = h[:, :w] * torch.sigmoid(x @ mlp.shared_gate.weight.T)
        out = h @ mlp.down_proj.weight.T
        return float(((out - y) ** 2).sum() / (y**2).sum())


def _data(teacher, n: int, seed: int):
    x = torch.randn(n, H, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, teacher(x)


@pytest.mark.parametrize("gated", [0, 8])  # 8: a qwen2_moe-style per-token gate on the first 8 units
def test_reported_errors_are_those_of_the_kept_weights(gated):
    teacher, student = _mlp(0, gated), _mlp(1, gated)
    start = copy.deepcopy(student)
    (x, y), (xv, yv) = _data(teacher, 512, 0), _data(teacher, 128, 1)
    options = HealOptions(steps=60, lr=0.1, batch_tokens=128, eval_every=10, patience=10)
    result = fit_layer(student, x, y, xv, yv, options, seed=0)
    assert result.error_before["train"] == pytest.approx(_direct_error(start, x, y), rel=1e-5)
    assert result.error_before["val"] == pytest.approx(_direct_error(start, xv, yv), rel=1e-5)
    assert result.error_after["train"] == pytest.approx(_direct_error(student, x, y), rel=1e-5)
    assert result.error_after["val"] == pytest.approx(_direct_error(student, xv, yv), rel=1e-5)
    assert result.error_after["val"] < 0.7 * result.error_before["val"]
    # the weights kept are the best scored ones, and every tensor trained (the shared gate too)
    assert result.error_after["val"] == pytest.approx(min(err for _, err in result.val_curve), rel=1e-5)
    assert dict(result.val_curve)[result.best_step] == pytest.approx(result.error_after["val"], rel=1e-5)
    for name, tensor in student.state_dict().items():
        assert not torch.equal(tensor, start.state_dict()[name]), name


def test_early_stopping_keeps_the_start_when_held_out_error_only_grows():
    teacher, student = _mlp(0), _mlp(1)
    start = copy.deepcopy(student)
    x, y = _data(teacher, 512, 0)
    xv, _ = _data(teacher, 128, 1)
    with torch.no_grad():
        yv = start(xv)  # held out: the start is exact there, so any step makes it worse
    options = HealOptions(steps=200, lr=0.1, batch_tokens=128, eval_every=5, patience=3)
    result = fit_layer(student, x, y, xv, yv, options, seed=0)
    # two runs (the second at a tenth of the rate), each stopped after 3 scores without improvement
    assert result.best_step == 0 and result.stopped_early and result.steps == 15 and result.lr == pytest.approx(0.01)
    for name, tensor in student.state_dict().items():
        assert torch.equal(tensor, start.state_dict()[name]), name
    assert result.error_after["val"] == 0.0


def test_step_size_is_relative_to_each_weights_rms():
    """Adam's first step moves an element by lr * |g| / (|g| + eps): its group's learning rate, lr x RMS(W), for
    all but vanishing gradients."""
    teacher, student = _mlp(0), _mlp(1)
    with torch.no_grad():
        student.down_proj.weight.mul_(0.1)  # one tensor on another scale, as gate-scaled down_proj columns are
    start = copy.deepcopy(student)
    x, y = _data(teacher, 256, 0)
    options = HealOptions(steps=1, lr=0.05, batch_tokens=256, eval_every=1, patience=1)
    fit_layer(student, x, y, x[:64], y[:64], options, seed=0)
    for name, before in start.state_dict().items():
        moved = (student.state_dict()[name] - before).abs()
        rms = before.pow(2).mean().sqrt()
        step = 0.05 * float(rms)
        assert float(moved.max()) == pytest.approx(step, rel=1e-4), name
        assert float(moved.max()) <= step * (1 + 1e-5) and float((moved - step).abs().median()) < 1e-4 * step, name


def test_same_seed_same_weights_and_bad_options():
    teacher = _mlp(0)
    (x, y), (xv, yv) = _data(teacher, 256, 0), _data(teacher, 64, 1)
    options = HealOptions(steps=20, batch_tokens=64, eval_every=5)
    a, b = _mlp(1), _mlp(1)
    fit_layer(a, x, y, xv, yv, options, seed=3)
    fit_layer(b, x, y, xv, yv, options, seed=3)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    for bad, option in [(HealOptions(steps=0), "--steps"), (HealOptions(lr=-1.0), "--lr"),
                        (HealOptions(val_share=1.0), "--val-share"), (HealOptions(samples=0), "--samples")]:
        with pytest.raises(CdmoeError, match=option):
            bad.check()
    with pytest.raises(CdmoeError, match="at least 2 calibration windows"):
        HealOptions().split(1)
    assert HealOptions(val_share=0.1).split(100) == 90 and HealOptions(val_share=0.5).split(2) == 1


def test_heal_state_resumes_its_own_run_and_refuses_another_or_a_corrupt_file(tmp_path):
    """A heal's resumable state: the same key finds its healed layer; another key is refused naming what differs;
    a damaged or foreign file is refused; each in one line that says --force starts over."""
    from cdmoe.search.heal_fit import FitResult
    from cdmoe.search.heal_state import STATE_FILE, HealState

    key = {"original": "m", "calibration": {"samples": 4}, "options": {"steps": 10}}
    result = FitResult(steps=3, best_step=2, stopped_early=False, error_before={"train": 1.0, "val": 1.0},
                       error_after={"train": 0.5, "val": 0.6}, val_curve=[(0, 1.0), (2, 0.6)], seconds=0.1, lr=0.05)
    HealState(tmp_path, key).save_layer(3, result, {"w": torch.ones(2)})
    again = HealState(tmp_path, key)
    assert again.resumed == 1 and again.layer(3)[0] == result and torch.equal(again.layer(3)[1]["w"], torch.ones(2))
    with pytest.raises(CdmoeError, match=r"holds an interrupted heal with a different options;.*--force") as other:
        HealState(tmp_path, {**key, "options": {"steps": 20}})
    assert "\n" not in str(other.value)
    for content in ("{not json", "[1, 2]", '{"key_hash": "x", "layers": {"3": 1}}'):
        (tmp_path / STATE_FILE).write_text(content)
        with pytest.raises(CdmoeError, match=r"is corrupt \(not a cdmoe heal state\); pass --force to start over"):
            HealState(tmp_path, key)
