"""Run a model layer by layer from cached layer inputs.

One ordinary forward pass per calibration batch records, for every decoder layer, its
input hidden states and the keyword arguments the model passed to it (attention mask,
rotary position embeddings, ...). Afterwards any suffix of the model can be re-run from
layer ``l`` without touching layers ``< l``: this is what makes the greedy layer search
(Algorithm 2) cost a fraction of a full model pass per candidate.

Shapes: a batch is (B, S) token ids; hidden states are (B, S, H).
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter import attr_path, decoder_layers
from .families import FamilySpec

__all__ = ["LayerRunner"]


class LayerRunner:
    """Cached inputs of every decoder layer for a list of calibration batches."""

    def __init__(self, model: nn.Module, spec: FamilySpec, batches: list[torch.Tensor]):
        self.model = model
        self.layers = decoder_layers(model, spec)
        self.norm = attr_path(model, spec.final_norm)
        self.lm_head = model.get_output_embeddings()
        self.batches = batches
        n = len(self.layers)
        self.inputs: list[list[torch.Tensor]] = [[None] * len(batches) for _ in range(n)]  # type: ignore[list-item]
        self.kwargs: list[list[dict]] = [[None] * len(batches) for _ in range(n)]  # type: ignore[list-item]
        self.outputs: list[torch.Tensor] = [None] * len(batches)  # type: ignore[list-item]
        self._record(batches)

    @torch.no_grad()
    def _record(self, batches: list[torch.Tensor]) -> None:
        current = {}

        def pre_hook(idx):
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                rest.update(past_key_values=None, use_cache=False)
                self.inputs[idx][current["b"]] = hidden.detach()
                self.kwargs[idx][current["b"]] = rest

            return hook

        def last_hook(module, args, output):
            self.outputs[current["b"]] = (output[0] if isinstance(output, tuple) else output).detach()

        hooks = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        hooks.append(self.layers[-1].register_forward_hook(last_hook))
        try:
            for b, ids in enumerate(batches):
                current["b"] = b
                self.model(input_ids=ids, use_cache=False)
        finally:
            for h in hooks:
                h.remove()

    @torch.no_grad()
    def run(self, start: int, batch: int, hidden: torch.Tensor | None = None, stop: int | None = None,
            record_from: int | None = None) -> torch.Tensor:
        """Run layers ``start..stop-1`` on batch ``batch`` from its cached input (or ``hidden``).

        With ``record_from``, the inputs of layers ``>= record_from`` seen on the way replace
        the cache (used after the model changed at layer ``record_from - 1``).
        """
        hidden = self.inputs[start][batch] if hidden is None else hidden
        for idx in range(start, len(self.layers) if stop is None else stop):
            if record_from is not None and idx >= record_from:
                self.inputs[idx][batch] = hidden
            out = self.layers[idx](hidden, **self.kwargs[idx][batch])
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    @torch.no_grad()
    def final(self, last_hidden: torch.Tensor, kind: str) -> torch.Tensor:
        """The model's final output from the last layer's output: normed hidden states or logits."""
        normed = self.norm(last_hidden)
        return normed if kind == "hidden" else self.lm_head(normed)
