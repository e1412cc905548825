"""Run a model layer by layer from cached layer inputs.

The runner records, for every decoder layer and calibration batch, the layer's input
hidden states and the keyword arguments the model passes to it (attention mask, rotary
position embeddings, ...). Afterwards any suffix of the model can be re-run from layer
``l`` without touching layers ``< l``: this is what makes the greedy layer search
(Algorithm 2) cost a fraction of a full model pass per candidate.

Runs go layer-outer, batch-inner (:meth:`LayerRunner.run_all`), so that with a
:class:`~cdmoe.memory.layer_store.SequentialStore` each layer is loaded once per run and
released after. Recording:

- whole mode: one ordinary forward pass per batch, with hooks on every layer.
- sequential mode: the model's own forward runs up to layer 0 only (a catcher raises
  there, as GPTQ implementations do) to capture layer 0's input and kwargs; the kwargs
  serve every layer, except that families with per-layer attention types
  (``config.layer_types``, e.g. sliding-window layers) get one capture per type. Then the
  layers run one at a time over all batches.
- ``inputs_only`` (either mode): the sequential capture alone, no layer run; the caller walks
  the layers itself (healing, :mod:`cdmoe.search.heal_walk`).

Cached hidden states live in an activation cache (:mod:`cdmoe.memory.activation_cache`): CPU
memory by default, safetensors files with ``--activations disk``; a batch moves to the
compute device when it runs. Only the inputs of ``cached_layers`` (the layers later runs
start from; the search passes its MoE layers) are kept. The per-batch keyword arguments
(masks, rotary embeddings: small and shared by the layers) stay in memory.
Shapes: a batch is (B, S) token ids; hidden states are (B, S, H).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

import torch
from torch import nn

from ..memory.activation_cache import MemoryActivations
from ..memory.layer_store import ResidentStore
from ..models.adapter import attr_path, decoder_layers
from ..models.families import FamilySpec

__all__ = ["LayerRunner"]


CACHE_ARGUMENTS = ("cache", "past_key_values", "layer_past")  # the KV-cache argument's names across transformers releases


def without_cache(kwargs: dict) -> dict:
    """A decoder layer's keyword arguments with the KV cache off: whichever cache argument the
    model passed (``cache`` in transformers >= 5.24, ``past_key_values`` before) set to None,
    none added, so no deprecation warning fires."""
    out = {k: (None if k in CACHE_ARGUMENTS else v) for k, v in kwargs.items()}
    out["use_cache"] = False
    return out


class _Caught(Exception):
    """Raised by the layer-0 catcher to stop the model's forward pass."""


class LayerRunner:
    """Cached inputs of decoder layers (``cached_layers``, default all) for a list of calibration batches.

    ``activations``: where the hidden states are kept (:mod:`cdmoe.memory.activation_cache`; default
    in memory). The caller owns it (a disk cache's files go when the caller closes it).
    """

    def __init__(self, model: nn.Module, spec: FamilySpec, batches: list[torch.Tensor], store=None,
                 activations=None, cached_layers: Collection[int] | None = None, inputs_only: bool = False):
        self.model = model
        self.activations = activations if activations is not None else MemoryActivations()
        self.store = store if store is not None else ResidentStore(model, spec)
        self.device = self.store.device
        self.layers = decoder_layers(model, spec)
        self.norm = attr_path(model, spec.final_norm)
        self.lm_head = model.get_output_embeddings()
        self.batches = batches
        n = len(self.layers)
        self.cached_layers = set(range(n) if cached_layers is None else cached_layers)
        self.kwargs: list[list[dict]] = [[None] * len(batches) for _ in range(n)]  # type: ignore[list-item]
        self.outputs: list[torch.Tensor] = [None] * len(batches)  # type: ignore[list-item]
        if self.store.sequential or inputs_only:
            self._record_layerwise(run=not inputs_only)
        else:
            self._record()

    @torch.no_grad()
    def _record(self) -> None:
        current = {}

        def pre_hook(idx):
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                rest = without_cache(rest)
                if idx in self.cached_layers:
                    self.activations.put(("input", idx, current["b"]), hidden.detach())
                self.kwargs[idx][current["b"]] = rest

            return hook

        def last_hook(module, args, output):
            self.outputs[current["b"]] = (output[0] if isinstance(output, tuple) else output).detach()

        hooks = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        hooks.append(self.layers[-1].register_forward_hook(last_hook))
        try:
            for b, ids in enumerate(self.batches):
                current["b"] = b
                self.model(input_ids=ids.to(self.device), use_cache=False)
        finally:
            for h in hooks:
                h.remove()

    @torch.no_grad()
    def _catch_layer0(self, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Layer 0's input hidden states and kwargs from the model's own forward (stopped there)."""
        caught = {}

        def hook(module, args, kwargs):
            caught["hidden"] = args[0] if args else kwargs["hidden_states"]
            caught["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise _Caught

        handle = self.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.model(input_ids=ids.to(self.device), use_cache=False)
        except _Caught:
            pass
        finally:
            handle.remove()
        return caught["hidden"].detach(), without_cache(caught["kwargs"])

    @torch.no_grad()
    def _record_layerwise(self, run: bool = True) -> None:
        config = self.model.config
        types = list(getattr(config, "layer_types", None) or [])
        distinct = sorted(set(types)) if len(set(types)) > 1 else [None]
        for kind in distinct:
            if kind is not None:  # every layer of this type: the model builds that type's mask for layer 0
                config.layer_types = [kind] * len(types)
            try:
                for b, ids in enumerate(self.batches):
                    hidden, kwargs = self._catch_layer0(ids)
                    self.activations.put(("input", 0, b), hidden.cpu())
                    for idx in range(len(self.layers)):
                        if kind is None or types[idx] == kind:
                            self.kwargs[idx][b] = kwargs
            finally:
                if kind is not None:
                    config.layer_types = types
        if not run:  # ``inputs_only``: layer 0's inputs and every layer's kwargs, no layer run
            return
        self.outputs = [h.cpu() for h in self.run_all(0, record_from=1)]
        if 0 not in self.cached_layers:
            self.forget(0)

    def cached_input(self, layer: int, batch: int) -> torch.Tensor:
        """Layer ``layer``'s cached input hidden states on calibration batch ``batch``, (B, S, H)."""
        return self.activations.get(("input", layer, batch))

    def forget(self, layer: int) -> None:
        """Drop layer ``layer``'s cached inputs (no later run starts there)."""
        for b in range(len(self.batches)):
            self.activations.delete(("input", layer, b))

    def refresh_behind(self, layer: int) -> None:
        """Layer ``layer`` changed for good (condensed): re-record the inputs of the layers after it,
        and drop its own (it is no longer a candidate, so no run starts there again)."""
        self.run_all(layer, record_from=layer + 1)
        self.forget(layer)

    @torch.no_grad()
    def run_all(self, start: int, stop: int | None = None, record_from: int | None = None) -> list[torch.Tensor]:
        """Run layers ``start..stop-1`` on every batch from its cached input of layer ``start``.

        Returns the last layer's output per batch (on the compute device). With
        ``record_from``, the inputs of layers ``>= record_from`` seen on the way replace the
        cache (used after the model changed at layer ``record_from - 1``).
        """
        hiddens: list[torch.Tensor] = [None] * len(self.batches)  # type: ignore[list-item]
        for idx in range(start, len(self.layers) if stop is None else stop):
            with self.store.resident(idx) as layer:
                for b in range(len(hiddens)):
                    hidden = (self.cached_input(start, b) if idx == start else hiddens[b]).to(self.device)
                    if record_from is not None and idx >= record_from and idx in self.cached_layers:
                        self.activations.put(("input", idx, b), hidden.cpu())
                    out = layer(hidden, **self.kwargs[idx][b])
                    hiddens[b] = out[0] if isinstance(out, tuple) else out
        return hiddens

    def run_candidates(self, starts: list[int], swap) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """(candidate, last-layer outputs per batch) for several candidate layers, loading each layer once:
        :meth:`run_streams` with one stream per layer, ``swap(layer, on)``."""
        for i, lasts in self.run_streams(starts, lambda i, on: swap(starts[i], on)):
            yield starts[i], lasts

    @torch.no_grad()
    def run_streams(self, starts: list[int], swap) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """(i, last-layer outputs per batch) for several streams, loading each layer once.

        Stream ``i`` starts at layer ``starts[i]``'s cached input and runs that layer with
        ``swap(i, True)`` in effect (its candidate block; ``swap(i, False)`` restores the block)
        and the later layers as they are: per stream the same computation as ``run_all(starts[i])``
        with the candidate swapped in, but all streams share every layer load (several streams may
        start at one layer). Streams wait in the activation cache (one set of hidden states per
        stream: CPU memory, or files with ``--activations disk``); after the pass they are handed out
        one at a time, in the order of ``starts``, and dropped from the cache.
        """
        live: list[int] = []
        n = len(self.batches)
        for idx in range(min(starts), len(self.layers)):
            with self.store.resident(idx) as layer:
                live += [i for i, start in enumerate(starts) if start == idx]
                for i in live:
                    if starts[i] == idx:
                        swap(i, True)
                    for b in range(n):
                        hidden = self.cached_input(idx, b) if starts[i] == idx else self.activations.get(("stream", i, b))
                        out = layer(hidden.to(self.device), **self.kwargs[idx][b])
                        self.activations.put(("stream", i, b), (out[0] if isinstance(out, tuple) else out).cpu())
                    if starts[i] == idx:
                        swap(i, False)
        for i in range(len(starts)):
            yield i, [self.activations.pop(("stream", i, b)) for b in range(n)]

    @torch.no_grad()
    def final(self, last_hidden: torch.Tensor, kind: str) -> torch.Tensor:
        """The model's final output from the last layer's output: normed hidden states or logits."""
        normed = self.norm(last_hidden.to(self.device))
        return normed if kind == "hidden" else self.lm_head(normed)
