"""Train one condensed MLP to reproduce the original MoE block: layer-local distillation.

Given the block's inputs X (T, H) at one layer, as the healed model sees them, and the
ORIGINAL sparse MoE block's outputs Y = MoE(X) (T, H), the condensed MLP f (Eq. 3, fused:
gate/up/down, and qwen2_moe's shared-expert gate) is trained to minimise the mean squared
error ``mean_t ||f(x_t) - y_t||^2 / H`` with Adam on random minibatches of held-in tokens
(each tensor's step size relative to its RMS, 10% linear warm-up, cosine decay).
Held-out calibration windows (X_val, Y_val) are scored every ``eval_every`` steps; the best
weights so far are kept and training stops after ``patience`` scores without improvement.
If no step beat the start, training runs once more from the start at a tenth of the rate
(a layer whose Eq. 3 start is already close needs smaller steps); the start is kept if that
fails too, so healing never makes a layer worse on the held-out windows.
No labels and no backward pass through the model: only f's own parameters get gradients.

Errors are reported as the relative squared error ``||f(X) - Y||_F^2 / ||Y||_F^2`` (0 is
exact; the Eq. 3 layers of the demo model start at 0.6-0.8).

Precision: the trainable copy is fp32 (Adam's updates would vanish in bf16); on a GPU the
forward and backward run under autocast in the compute dtype, on the CPU in fp32. The
result is written back into the module in its own dtype and rounded by ``round_fn`` (the
dtypes it will be stored in), so that what is measured "after" is what will be saved.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import CdmoeError

__all__ = ["FitResult", "HealOptions", "fit_layer", "relative_error"]

CHUNK_TOKENS = 8192  # tokens per forward pass when scoring a whole set
WARMUP = 0.1  # share of the steps over which the learning rate rises linearly (then cosine decay)
BACKOFF = 0.1  # the second run's rate, relative to the first, when no step of the first beat the start


@dataclass(frozen=True)
class HealOptions:
    """How each condensed layer is trained (see the README's "Healing" for why these defaults)."""

    samples: int | None = None  # calibration windows for healing (None: as many as the search used)
    val_share: float = 0.1  # share of the windows held out for validation and early stopping
    steps: int = 300  # maximum optimizer steps per layer
    lr: float = 0.05  # Adam's step size relative to each weight tensor's RMS; cosine decay to 0 over ``steps``
    batch_tokens: int = 4096  # tokens per step, drawn at random from the held-in windows
    eval_every: int = 25  # steps between validation scores
    patience: int = 4  # validation scores without improvement before stopping
    seed: int = 0  # minibatch draws (each layer seeds its own generator with seed + layer)

    def check(self) -> None:
        """One-line errors for impossible values (before anything is loaded)."""
        positive = {"--steps": self.steps, "--batch-tokens": self.batch_tokens, "--eval-every": self.eval_every,
                    "--patience": self.patience}
        if self.samples is not None:
            positive["--samples (--heal-samples)"] = self.samples
        for option, value in positive.items():
            if value < 1:
                raise CdmoeError(f"{option} must be at least 1, got {value}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise CdmoeError(f"--lr must be a positive number, got {self.lr}")
        if not 0 < self.val_share < 1:
            raise CdmoeError(f"--val-share must be in (0, 1), got {self.val_share}")

    def split(self, windows: int) -> int:
        """How many of ``windows`` calibration windows are held in (the rest validate); at least one each."""
        if windows < 2:
            raise CdmoeError(f"healing needs at least 2 calibration windows (one to train on, one to validate), got "
                             f"{windows}; pass more --samples (--heal-samples)")
        return min(windows - 1, max(1, round(windows * (1 - self.val_share))))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FitResult:
    steps: int  # optimizer steps taken
    best_step: int  # the step whose weights were kept (0: the initial weights)
    stopped_early: bool
    error_before: dict  # {"train": r, "val": r}, relative squared errors
    error_after: dict
    val_curve: list  # [(step, val error)] of the run whose weights were kept
    seconds: float
    lr: float = 0.0  # the relative rate of that run (options.lr, or options.lr * BACKOFF after a run that never helped)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def relative_error(mlp: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast=None) -> float:
    """``||mlp(x) - y||_F^2 / ||y||_F^2`` over all T tokens of x (T, H), y (T, H), in fp32 sums."""
    num = den = 0.0
    device = next(mlp.parameters()).device
    dtype = next(mlp.parameters()).dtype
    for start in range(0, x.shape[0], CHUNK_TOKENS):
        xb = x[start:start + CHUNK_TOKENS].to(device)
        yb = y[start:start + CHUNK_TOKENS].to(device).float()
        with autocast() if autocast is not None else contextlib.nullcontext():
            out = mlp(xb.to(dtype) if autocast is None else xb).float()
        num += float((out - yb).pow(2).sum())
        den += float(yb.pow(2).sum())
    return num / den if den > 0 else float("nan")


def _autocast(device: torch.device, dtype: torch.dtype):
    """Autocast in the compute dtype on a GPU (half precision); None (plain fp32) elsewhere."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return lambda: torch.autocast("cuda", dtype=dtype)
    return None


def _param_groups(module: nn.Module, lr: float) -> list[dict]:
    """One Adam group per tensor, its step size ``lr`` times the tensor's RMS (a tensor that is all zeros,
    e.g. a bias, takes the mean RMS of the others): Adam moves each element by about its learning rate
    whatever the gradient's scale, so a relative rate transfers across models whose weights differ in scale."""
    params = list(module.parameters())
    rms = [float(p.detach().float().pow(2).mean().sqrt()) for p in params]
    nonzero = [r for r in rms if r > 0] or [1.0]
    groups = []
    for p, r in zip(params, rms):
        p.requires_grad_(True)
        groups.append({"params": [p], "lr": lr * (r if r > 0 else sum(nonzero) / len(nonzero))})
    return groups


def _train(student: nn.Module, x_train, y_train, x_val, y_val, options: HealOptions, lr: float, seed: int, autocast,
           start_error: float) -> tuple[dict | None, int, list, int, bool]:
    """Adam (relative rate ``lr``) with warm-up and cosine decay on random minibatches;
    (best state or None, its step, curve, steps, stopped early)."""
    device = next(student.parameters()).device
    optimizer = torch.optim.Adam(_param_groups(student, lr))
    warmup = max(1, round(WARMUP * options.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(step, options.steps) / options.steps)))
    gen = torch.Generator().manual_seed(seed)
    best_err, best_step, best_state = start_error, 0, None
    curve, bad, step, stopped = [(0, start_error)], 0, 0, False
    n = x_train.shape[0]
    for step in range(1, options.steps + 1):
        idx = torch.randint(0, n, (min(options.batch_tokens, n),), generator=gen)
        xb, yb = x_train[idx].to(device), y_train[idx].to(device).float()
        with autocast() if autocast is not None else contextlib.nullcontext():
            out = student(xb if autocast is not None else xb.float())
        loss = (out.float() - yb).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % options.eval_every == 0 or step == options.steps:
            err = relative_error(student, x_val, y_val, autocast)
            curve.append((step, err))
            if err < best_err:
                best_err, best_step, bad = err, step, 0
                best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
            else:
                bad += 1
                if bad >= options.patience:
                    stopped = step < options.steps
                    break
    return best_state, best_step, curve, step, stopped


def fit_layer(mlp: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
              options: HealOptions, seed: int, round_fn: Callable[[nn.Module], None] | None = None) -> FitResult:
    """Train ``mlp`` in place to map ``x_train`` (T, H) to ``y_train`` (T, H); return what happened.

    ``mlp``'s own weights are the start (Eq. 3, as stored); they are replaced by the fp32 copy's weights
    with the lowest validation error (the start's, if no step beat it), cast to ``mlp``'s dtype and
    rounded by ``round_fn``. The minibatch draws come from a generator seeded with ``seed``.
    """
    started = time.perf_counter()
    autocast = _autocast(next(mlp.parameters()).device, next(mlp.parameters()).dtype)
    before = {"train": relative_error(mlp, x_train, y_train, autocast),
              "val": relative_error(mlp, x_val, y_val, autocast)}
    for lr in (options.lr, options.lr * BACKOFF):  # a lower rate only if no step of the first run helped
        student = copy.deepcopy(mlp).float().train()
        with torch.enable_grad():
            best_state, best_step, curve, steps, stopped = _train(student, x_train, y_train, x_val, y_val, options, lr,
                                                                  seed, autocast, before["val"])
        if best_state is not None:
            break
    with torch.no_grad():
        if best_state is not None:
            for name, tensor in mlp.state_dict().items():
                tensor.copy_(best_state[name].to(tensor.dtype))
        if round_fn is not None:
            round_fn(mlp)
    after = {"train": relative_error(mlp, x_train, y_train, autocast),
             "val": relative_error(mlp, x_val, y_val, autocast)}
    return FitResult(steps=steps, best_step=best_step, stopped_early=stopped, error_before=before, error_after=after,
                     val_curve=curve, seconds=time.perf_counter() - started, lr=lr)
