"""What the resumable searches share (``cdmoe condense`` with ``--layers`` or ``--budget``): the checks before any
work, the calibration tokens, the resumable output directory, the model whole or layer by layer, progress.

    session = start_session(model, out, calib, texts, dtype, device, mode, force, activations, activations_dir)
    with session.open(key, state_cls) as (tmp, state, loaded, store, cache):
        ...search, write the output into tmp...
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint.writer import STATE_DIR, atomic_output_dir, check_output_dir, partial_dir, write_condensed
from ..errors import CdmoeError
from ..io.write_rule import check_write_path, remove_work_dir
from ..memory.activation_cache import DIR_PREFIX, activation_cache, check_activations
from ..memory.devices import resolve_device
from ..memory.fit import Free, RunChoice, choose_run, free_now
from ..memory.host import return_freed_memory
from ..memory.layer_store import SequentialStore
from ..models.compressed_bytes import CODE_BYTES
from ..models.input_checks import check_inputs
from ..models.loading import checkpoint_dtype, compute_dtype, load_model, load_tokenizer
from ..models.placement import describe, place
from ..models.plan import count, declares_block_fp8, storage_bytes
from ..search.calibration import CalibSpec, load_calibration
from ..search.run import SearchOptions
from .compressed_stream import quantize_written

__all__ = ["Session", "progress_note", "rich_progress", "run_choice", "start_session"]


def rich_progress():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), transient=False)


def progress_note(text: str) -> None:
    from rich.console import Console

    Console(stderr=True, markup=False).print(text, highlight=False)


@dataclass
class Session:
    """One resumable run: where it computes and what it read (made by :func:`start_session`)."""

    model: str | Path
    out: Path
    calib: CalibSpec
    dtype: str
    device: str
    dev: torch.device
    compute: torch.dtype
    mode: str
    why: str
    force: bool
    inputs: tuple
    activations: str
    activations_dir: str | Path | None
    choice: RunChoice | None = None  # the memory estimate and what it chose (mode, activations, Algorithm 1's budgets)
    tokenizer: object = None
    calib_ids: torch.Tensor | None = None
    started: float = field(default_factory=time.perf_counter)

    def calibrate(self) -> torch.Tensor:
        self.tokenizer = load_tokenizer(self.model)
        self.calib_ids = load_calibration(self.tokenizer, self.calib)
        return self.calib_ids

    def heal(self, tmp: Path, record: dict, options, show_progress: bool) -> dict:
        """Heal the condensed layers of the output just written to ``tmp`` on this run's calibration source
        (``condense --heal``, with ``--layers`` or ``--budget``); return the record with its ``heal`` entry."""
        from .heal import heal_condensed_output

        return heal_condensed_output(tmp, record, self.model, self.calib, self.calib_ids, options, mode=self.mode,
                                     device=self.dev, dtype=self.dtype, tokenizer=self.tokenizer,
                                     activations=self.activations, activations_dir=self.activations_dir,
                                     show_progress=show_progress)

    def quantize(self, tmp: Path, record: dict, scheme: str, group: int | None = None) -> dict:
        """Quantise the (healed) output just written to ``tmp`` with compressed-tensors' ``scheme``, in this run's
        mode (``--heal --quantize``, with ``--layers`` or ``--budget``); rewrite its record and model card and
        return the record with its ``quantization`` entry. ``group``: w4a16's group size (default: from the widths)."""
        record = quantize_written(tmp, record, scheme, mode=self.mode, device=self.dev, dtype=self.dtype, group=group)
        write_condensed(tmp, record, lambda d: None)
        return record

    @contextlib.contextmanager
    def open(self, key: dict, state_cls) -> Iterator[tuple]:
        """(tmp dir, state, model, store or None, activation cache): the partial output directory with the
        resumable ``state_cls`` progress of ``key``, the model (whole: loaded; sequential: a skeleton whose
        layers load on demand) and where calibration activations wait."""
        with atomic_output_dir(self.out, force=self.force, resumable=True, inputs=self.inputs) as tmp:
            state = state_cls(tmp / STATE_DIR, key)
            if state.resumed:  # printed even with --quiet: the user should know the run continues an old one
                progress_note(f"resuming the interrupted run in {tmp / STATE_DIR}: {state.resumed}")
            for stale in tmp.glob(f"{DIR_PREFIX}*"):  # a killed run's activation cache, never part of the output
                remove_work_dir(stale)
            placement = place(self.device, whole=self.mode == "whole")
            if placement.device.type == "cuda":
                progress_note(f"computing in {str(self.compute).removeprefix('torch.')} on {describe(placement)}")
            if self.mode == "whole":
                loaded, store = load_model(self.model, dtype=self.dtype, device=self.device), None
            else:
                store = SequentialStore(self.model, device=self.dev, dtype=self.compute)
                loaded = store.model
            with activation_cache(self.activations, self.activations_dir or tmp) as cache:
                yield tmp, state, loaded, store, cache


def start_session(model: str | Path, out: str | Path, calib: CalibSpec, texts: dict, *, dtype: str, device: str,
                  mode: str, force: bool, activations: str, activations_dir, search: SearchOptions | None = None,
                  memory_check: bool = True, quantize: str | None = None) -> Session:
    """Check everything that needs no model (inputs, output directory, device) and choose the mode and the
    activations' place from the memory estimate of the run (``search``; default: one layer, Algorithm 1's
    defaults; ``quantize``: the output's scheme), refusing before anything loads when nothing fits (unless
    ``memory_check`` is False)."""
    check_activations(activations, activations_dir)
    dev = resolve_device(device)
    check_inputs(model, calib, texts)
    inputs = (model, calib.source, *texts.values())
    check_output_dir(out, force, inputs)
    if activations_dir is not None:
        check_write_path(activations_dir, option="--activations-dir", inputs=inputs, kind="parent",
                         avoid=(out, partial_dir(out)))
    compute = compute_dtype(dtype, str(dev))
    if compute == "auto":  # GPU: compute in the checkpoint's dtype
        compute = checkpoint_dtype(model) or torch.float32
    choice = run_choice(model, count(model), dev.type, compute, search or SearchOptions(layers=1), calib, mode,
                        activations, free_now(dev, out, activations_dir), memory_check, quantize)
    return_freed_memory()  # freed tensors go back to the system (see memory.host)
    return Session(model=model, out=Path(out), calib=calib, dtype=dtype, device=device, dev=dev, compute=compute,
                   mode=choice.mode, why=choice.why, force=force, inputs=inputs, activations=choice.activations,
                   activations_dir=activations_dir, choice=choice)


def run_choice(source, known, device_type: str, compute: torch.dtype, search: SearchOptions, calib: CalibSpec,
               mode: str, activations: str, free: Free | None, check: bool = True,
               quantize: str | None = None) -> RunChoice:
    """Mode, activation place and Algorithm 1's budgets for condensing the model ``source`` (counted:
    ``known``, :func:`cdmoe.models.plan.count`) on ``device_type`` in ``compute``, from the estimate (config
    only: nothing is loaded) and what is ``free`` (None: unknown, no check); ``quantize``: the output's
    compressed-tensors scheme, whose codes the writer holds."""
    from ..memory.estimate import RunShape

    if mode not in ("auto", "whole", "sequential"):
        raise CdmoeError(f"unknown --mode {mode!r}; use auto, whole or sequential")
    check_activations(activations)
    config, params = known[0], known[1]
    # weights cost the compute dtype's bytes (an FP8 source is dequantised: 2x its file in bf16), the file its own
    base = RunShape(mode="whole", device=device_type, compute_bytes=compute.itemsize,
                    storage_bytes=storage_bytes(source, config, params), samples=calib.samples, seq_len=calib.seq_len,
                    batch_size=search.batch_size, experts=search.experts,
                    final="logits" if search.metric == "ppl" else search.final, metric=search.metric,
                    dequant_bytes=(4 + 2) * params.largest_source if declares_block_fp8(config) else 0,
                    quantize_bytes=CODE_BYTES.get(quantize, 0.0))
    return choose_run(params, base, mode, activations, free, check=check)
