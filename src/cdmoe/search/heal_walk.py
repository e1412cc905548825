"""Heal a condensed model layer by layer, on the inputs the healed model itself sees.

    record layer 0's inputs (and every layer's keyword arguments) for the calibration windows
    for layer l = 0 .. the last condensed layer, in order:
        load layer l (sequential mode: from the shards; whole mode: already there)
        if l is condensed:
            run the ORIGINAL layer on its cached inputs -> X (MoE block inputs), Y = MoE(X)
            f = the condensed MLP as it starts (Eq. 3, as stored); train f on (X, Y) (heal_fit)
            put f in the layer's place
        run layer l on its cached inputs -> the inputs of layer l + 1; drop layer l's

The inputs of a condensed layer were produced by the healed layers before it, so every
layer is trained on what it will see in the healed model, and the target is always the
original block on those inputs. Only one decoder layer, its inputs (the calibration hidden
states, (B, S, H) per batch, in the activation cache: CPU memory or disk) and one layer's
X, Y are held at a time; the healed weights go to the :class:`~cdmoe.search.heal_state.HealState`
as each layer finishes, so an interrupted walk resumes from there (the finished layers are
re-run with their saved weights, not retrained).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..memory.activation_cache import MemoryActivations
from ..models.adapter import MoEBlock
from .heal_fit import FitResult, HealOptions, fit_layer
from .heal_state import HealState
from .run import layer_activations
from .runner import LayerRunner

__all__ = ["LayerStart", "heal_walk"]

# builds the condensed MLP a layer starts from (on the block's device, in the compute dtype) from the
# ORIGINAL block, and gives the function that rounds its tensors, in place, to the values they will be
# stored as (their dtypes; block-FP8 weights through their blocks)
LayerStart = Callable[[MoEBlock], tuple[nn.Module, Callable[[nn.Module], None]]]


@contextlib.contextmanager
def swapped(layer: nn.Module, attr: str, module: nn.Module) -> Iterator[None]:
    """``layer.attr`` is ``module`` inside the block, the original again after (also on error)."""
    original = getattr(layer, attr)
    setattr(layer, attr, module)
    try:
        yield
    finally:
        setattr(layer, attr, original)


@torch.no_grad()
def heal_walk(model: nn.Module, store, batches: list[torch.Tensor], train_batches: int, starts: dict[int, LayerStart],
              options: HealOptions, state: HealState, activations=None,
              progress: Callable[[int, int], None] | None = None) -> dict[int, FitResult]:
    """Heal the layers in ``starts`` (decoder layer index -> how its condensed MLP starts); return what
    happened per layer. The healed weights are in ``state`` (:meth:`HealState.layer`).

    ``model``/``store``: the ORIGINAL model and its layer store (a
    :class:`~cdmoe.memory.layer_store.ResidentStore` or :class:`~cdmoe.memory.layer_store.SequentialStore`);
    the model is left as it was. ``batches``: calibration token ids (B, S) per batch, the first
    ``train_batches`` held in, the rest held out for validation and early stopping.
    """
    spec = store.spec
    activations = activations if activations is not None else MemoryActivations()
    runner = LayerRunner(model, spec, batches, store, activations, cached_layers=[0], inputs_only=True)
    train_rows = sum(b.numel() for b in batches[:train_batches])  # X rows are tokens in batch order
    results: dict[int, FitResult] = {}
    last = max(starts)
    for idx in range(last + 1):
        with store.resident(idx) as layer:
            if idx not in starts:
                outs = runner.run_all(idx, stop=idx + 1) if idx < last else None
            else:
                block = MoEBlock(idx, getattr(layer, spec.block_attr), spec, model.config)
                mlp, round_fn = starts[idx](block)
                done = state.layer(idx)
                if done is not None:  # trained by an interrupted run
                    results[idx], weights = done
                    mlp.load_state_dict({k: v.to(mlp.state_dict()[k].device) for k, v in weights.items()})
                else:
                    acts = layer_activations(runner, block, 1.0)  # X and the ORIGINAL block's Y on these inputs
                    x, y = acts.x, acts.y
                    del acts
                    results[idx] = fit_layer(mlp, x[:train_rows], y[:train_rows], x[train_rows:], y[train_rows:],
                                             options, options.seed + idx, round_fn)
                    del x, y
                    state.save_layer(idx, results[idx], mlp.state_dict())
                with swapped(layer, spec.block_attr, mlp):
                    outs = runner.run_all(idx, stop=idx + 1) if idx < last else None
                del mlp
                if progress is not None:
                    progress(len(results), len(starts))
        if outs is not None:
            for b, hidden in enumerate(outs):
                activations.put(("input", idx + 1, b), hidden.cpu())
            del outs
        runner.forget(idx)
    return results
