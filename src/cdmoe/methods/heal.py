"""``cdmoe heal`` and ``cdmoe condense --heal``: train the condensed layers to reproduce the original MoE blocks.

Layer-local distillation (:mod:`cdmoe.search.heal_walk`, :mod:`cdmoe.search.heal_fit`): each condensed
MLP starts from the weights its directory stores (Eq. 3 after ``cdmoe condense``) and is trained, in
layer order, to map the inputs the healed model sees at that layer to the ORIGINAL block's output
on them (MSE on held-in calibration windows, early stopping on held-out ones). The original model
comes from the record's ``base_model`` (or ``original``), whole or one decoder layer at a time
(sequential mode). The output is the condensed directory with only those MLPs' values changed
(same files, tensor names, shapes and dtypes), so it loads and serves as the condensed one did;
``cdmoe.json`` gains a ``heal`` entry and the model card says the layer weights were trained.
Progress is kept layer by layer in ``state/heal/`` of the partial output directory; rerunning
the same command after an interruption resumes there.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Collection
from contextlib import nullcontext
from pathlib import Path

import torch

from ..checkpoint.record import check_record_matches, read_record
from ..checkpoint.replace import copy_with_replaced_tensors
from ..checkpoint.stored_values import StoredValues
from ..checkpoint.writer import STATE_DIR, atomic_output_dir, check_output_dir, write_condensed
from ..errors import CdmoeError
from ..evaluation.perplexity import perplexity, token_stream
from ..io.output_dir import partial_dir
from ..io.write_rule import check_write_path, remove_work_dir
from ..memory.activation_cache import DIR_PREFIX, activation_cache, check_activations
from ..memory.devices import resolve_device
from ..memory.fit import free_now
from ..memory.layer_store import ResidentStore, SequentialStore, checkpoint_tensor_files
from ..models.adapter import family_spec
from ..models.condensed import fuse_condensed_mlp
from ..models.input_checks import check_inputs
from ..models.loading import checkpoint_dtype, compute_dtype, load_model, load_tokenizer
from ..models.placement import describe, place
from ..search.calibration import CalibSpec, load_calibration
from ..search.heal_fit import HealOptions
from ..search.heal_state import HealState
from ..search.heal_walk import heal_walk
from ..search.resume import model_key, tokens_key
from ..models.plan import count
from ..search.run import SearchOptions
from .condense import EvalOptions
from .session import progress_note, rich_progress, run_choice

__all__ = ["HealOptions", "heal", "heal_condensed_output", "heal_directory"]

BATCH = 8  # calibration windows per layer forward
HEAL_STATE = "heal"  # inside the partial directory's state/


def heal(directory: str | Path, out: str | Path, options: HealOptions = HealOptions(), *,
         original: str | Path | None = None, calib: str | None = None, seq_len: int | None = None,
         seed: int | None = None, evaluation: EvalOptions = EvalOptions(),
         dtype: str = "auto", mode: str = "auto", device: str = "auto", activations: str = "auto",
         activations_dir: str | Path | None = None, force: bool = False, show_progress: bool = True) -> dict:
    """Heal the condensed directory ``directory`` into ``out``; return the new record.

    ``calib``, ``seq_len``, ``seed``, ``options.samples``: the calibration windows (each by default the record's).
    ``evaluation.text``: held-out perplexity of ``directory`` and ``out`` (whole mode), and the gap closed
    when the record holds the original model's perplexity on the same tokens.
    """
    options.check()
    check_activations(activations, activations_dir)
    record = _condensed_record(directory)
    original = str(original or record.get("base_model") or "")
    calib = _heal_calibration(record, calib, options.samples, seq_len, seed)
    check_inputs(original, calib, {"--eval-text": evaluation.text})
    inputs = (directory, original, calib.source, evaluation.text)
    check_output_dir(out, force, inputs)
    if activations_dir is not None:
        check_write_path(activations_dir, option="--activations-dir", inputs=inputs, kind="parent",
                         avoid=(out, partial_dir(out)))
    dev = resolve_device(device)
    compute = _compute(dtype, dev, original)
    # planned as a one-layer condense of the original on the same windows: its search working set bounds healing's
    choice = run_choice(original, count(original), dev.type, compute, SearchOptions(layers=1), calib, mode,
                        activations, free_now(dev, out, activations_dir))
    mode, activations, why = choice.mode, choice.activations, choice.why
    if mode == "sequential" and evaluation.text:
        raise CdmoeError("--eval-text needs the whole model in memory; drop it (evaluate the output with cdmoe eval) "
                         "or use --mode whole")
    tokenizer = load_tokenizer(directory)
    calib_ids = load_calibration(tokenizer, calib)
    if dev.type == "cuda":
        progress_note(f"computing in {str(compute).removeprefix('torch.')} on {describe(place(dev, whole=False))}")
    with atomic_output_dir(out, force=force, resumable=True, inputs=inputs) as tmp:
        new = heal_directory(directory, tmp, record, original, calib_ids, calib.to_dict(), options, mode=mode,
                             device=dev, dtype=dtype, state_dir=tmp / STATE_DIR / HEAL_STATE, activations=activations,
                             activations_dir=activations_dir, show_progress=show_progress)
        new["heal"]["mode_reason"] = why
        if evaluation.text:  # the healed files as saved, before they become ``out``
            new["heal"]["evaluation"] = _evaluate(directory, tmp, tokenizer, record, evaluation, calib.seq_len, dev)
        write_condensed(tmp, new, lambda d: None)
    return new


def heal_directory(source: str | Path, dest: str | Path, record: dict, original: str | Path, calib_ids: torch.Tensor,
                   calib_info: dict, options: HealOptions, *, mode: str, device: torch.device, dtype: str,
                   state_dir: Path, activations: str = "memory", activations_dir: str | Path | None = None,
                   show_progress: bool = False, layers: Collection[int] | None = None) -> dict:
    """The healing step on files: ``source`` (a condensed directory with ``record``, made from
    ``original``) is written to ``dest`` (may be ``source``) with its condensed MLPs healed on the
    calibration windows ``calib_ids`` (N, S). Returns ``record`` with its ``heal`` entry (not yet
    written to ``dest``'s cdmoe.json). ``state_dir``: where the per-layer progress is kept.
    ``layers``: heal only these condensed layers (decoder layer indices; default: every one the record
    condenses); the others keep their bytes. The entry point for any directory of condensed layers.
    """
    started = time.perf_counter()
    chosen = _chosen(record, layers)
    compute = _compute(dtype, device, original)
    if mode == "whole":
        model = load_model(original, dtype=dtype, device=str(device))
        store = ResidentStore(model, family_spec(model))
    else:
        store = SequentialStore(original, device=device, dtype=compute)
        model = store.model
    check_record_matches(record, model, original)
    spec, source = store.spec, Path(source)
    files = checkpoint_tensor_files(source)
    prefixes = {int(c["layer"]): f"{spec.layers_path}.{c['layer']}.{spec.block_attr}." for c in chosen}
    names = {k for k in files if any(k.startswith(p) for p in prefixes.values())}
    key = {"original": model_key(original), "start_sha256": _tensors_sha256(source, files, names),
           "calibration": {**calib_info, "tokens_sha256": tokens_key(calib_ids)}, "options": options.to_dict(),
           "compute": {"dtype": str(compute), "device": device.type}}
    state = HealState(state_dir, key)
    for stale in Path(state_dir).glob(f"{DIR_PREFIX}*"):  # a killed run's activation cache
        remove_work_dir(stale)
    stored = StoredValues(source, files)  # plain tensors, or block-FP8 weights (an FP8 output)
    starts = {int(c["layer"]): _starter(stored, prefixes[int(c["layer"])], c) for c in chosen}
    n_train = options.split(calib_ids.shape[0])
    train, val = list(calib_ids[:n_train].split(BATCH)), list(calib_ids[n_train:].split(BATCH))
    progress = rich_progress() if show_progress else None
    task = progress.add_task("healing condensed layers", total=len(starts)) if progress else None

    def report(done: int, total: int) -> None:
        if progress is not None:
            progress.update(task, completed=done)

    with progress or nullcontext(), activation_cache(activations, activations_dir or state_dir) as cache:
        results = heal_walk(model, store, train + val, len(train), starts, options, state, cache, report)
    del model, store

    def values(keys: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for layer, prefix in prefixes.items():
            wanted = {k for k in keys if k.startswith(prefix)}
            if wanted:
                for name, value in state.layer(layer)[1].items():
                    encoded = stored.encode(prefix + name, value)  # an fp8 weight gives its scales too
                    out.update({k: v for k, v in encoded.items() if k in wanted})
        return out

    copy_with_replaced_tensors(source, Path(dest), names, values)
    entry = {
        "method": "layer-local distillation: each condensed MLP trained to reproduce the original MoE block's "
                  "output (MSE) on the inputs the healed model sees at that layer, layers in order",
        "trained": sorted({k.removeprefix(p) for p in prefixes.values() for k in names - stored.scale_names
                           if k.startswith(p)}),
        "original": str(original),
        "calibration": {**calib_info, "samples": int(calib_ids.shape[0]), "windows_train": n_train,
                        "windows_val": int(calib_ids.shape[0]) - n_train,
                        "tokens_train": int(calib_ids[:n_train].numel()), "tokens_val": int(calib_ids[n_train:].numel())},
        "options": options.to_dict(),
        "layers": {str(layer): results[layer].to_dict() for layer in sorted(results)},
        "mode": mode, "device": str(device), "compute_dtype": str(compute).removeprefix("torch."),
        "seconds": time.perf_counter() - started,
    }
    if state.resumed:
        entry["resumed_layers"] = state.resumed
    new = {k: v for k, v in record.items() if k != "versions"}
    if "heal" in record:  # healing a healed directory: keep the earlier entry
        entry["previous"] = record["heal"]
    new["heal"] = entry
    return new


def heal_condensed_output(tmp: Path, record: dict, model, calib: CalibSpec, calib_ids: torch.Tensor,
                          options: HealOptions, *, mode: str, device: torch.device, dtype: str, tokenizer,
                          activations: str = "memory", activations_dir=None, show_progress: bool = False) -> dict:
    """``cdmoe condense --heal``: heal the condensed output just written to ``tmp`` (in place) on the
    search's calibration source (its windows, or ``options.samples`` windows of it); rewrite its record
    and model card; measure the healed perplexity from disk if the record has an evaluation."""
    if options.samples is not None and options.samples != calib.samples:
        calib = CalibSpec(calib.source, options.samples, calib.seq_len, calib.seed)
        calib_ids = load_calibration(tokenizer, calib)
    new = heal_directory(tmp, tmp, record, model, calib_ids, calib.to_dict(), options, mode=mode, device=device,
                         dtype=dtype, state_dir=tmp / STATE_DIR / HEAL_STATE, activations=activations,
                         activations_dir=activations_dir, show_progress=show_progress)
    ev = new.get("evaluation")
    if ev:  # as a user loads it
        stream = token_stream(tokenizer, ev["text"], ev["tokens"])
        ev["healed_ppl"] = perplexity(load_model(tmp, device=device), stream, ev["seq_len"])
    write_condensed(tmp, new, lambda d: None)
    return new


def _chosen(record: dict, layers: Collection[int] | None) -> list[dict]:
    """The record's condensed-layer entries to heal: all, or those of ``layers`` (each must be condensed)."""
    condensed = record["condensed"]
    if layers is None:
        return condensed
    wanted, have = {int(i) for i in layers}, {int(c["layer"]) for c in condensed}
    if not wanted or wanted - have:
        raise CdmoeError(f"layers {sorted(wanted - have) or '(none)'} are not condensed in this directory; choose among "
                         f"{sorted(have)}")
    return [c for c in condensed if int(c["layer"]) in wanted]


def _condensed_record(directory) -> dict:
    method = read_record(directory).get("method", "cd-moe")
    if method not in ("cd-moe", "budget"):  # budget: the planner's condensed layers (its other layers stay)
        raise CdmoeError(f"{directory} holds a {method} output; cdmoe heal trains the condensed layers of a cdmoe "
                         "condense output (--layers or --budget)")
    record = read_record(directory, condensed=True)
    if not record.get("condensed"):
        raise CdmoeError(f"{directory} has no condensed layer to heal (its plan prunes or drops only)")
    if record.get("quantization"):
        raise CdmoeError(f"{directory} is quantised; heal the condensed directory before quantising it")
    return record


def _heal_calibration(record: dict, source: str | None, samples: int | None, seq_len: int | None,
                      seed: int | None) -> CalibSpec:
    """The calibration windows to heal on: each of source, samples, seq_len, seed as given, else the record's."""
    used = (record.get("search") or {}).get("calibration")
    used = used if isinstance(used, dict) else {}
    if source is None and "source" not in used:
        raise CdmoeError("the record names no calibration data; pass --calib")
    default = CalibSpec()
    pick = lambda given, key: given if given is not None else used.get(key, getattr(default, key))  # noqa: E731
    return CalibSpec(pick(source, "source"), pick(samples, "samples"), pick(seq_len, "seq_len"), pick(seed, "seed"))


def _compute(dtype: str, device: torch.device, original) -> torch.dtype:
    compute = compute_dtype(dtype, str(device))
    return (checkpoint_dtype(original) or torch.float32) if compute == "auto" else compute


def _tensors_sha256(source: Path, files: dict[str, str], names: set[str]) -> str:
    """sha256 of the named tensors' names, dtypes, shapes and bytes: the weights healing starts from."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    for name in sorted(names):
        with safe_open(source / files[name], "pt") as f:
            tensor = f.get_tensor(name).contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _starter(stored: StoredValues, prefix: str, choice: dict):
    """How layer ``choice['layer']`` starts: the fused MLP of Eq. 3 (its structure) holding the values
    the directory stores, and the rounding to the form each is stored in."""

    def start(block):
        mlp = fuse_condensed_mlp(block, tuple(choice["experts"]), tuple(choice["gates"]))
        values, forms = stored.read(prefix)
        expected = mlp.state_dict()
        if set(values) != set(expected) or any(values[k].shape != expected[k].shape for k in expected):
            raise CdmoeError(f"{stored.directory}: the condensed MLP of layer {choice['layer']} holds "
                             f"{ {k: tuple(v.shape) for k, v in values.items()} }, its record and the original model "
                             f"make { {k: tuple(v.shape) for k, v in expected.items()} }; is base_model the model it "
                             "was condensed from?")
        mlp.load_state_dict(values)  # cast to the compute dtype, on the block's device
        return mlp, stored.round(forms)

    return start


def _evaluate(directory, out, tokenizer, record: dict, evaluation: EvalOptions, calib_seq_len: int,
              device: torch.device) -> dict:
    """Held-out perplexity before (``directory``) and after (``out``, as saved), and the gap closed."""
    earlier = record.get("evaluation") or {}
    seq_len = evaluation.seq_len or (earlier.get("seq_len") if earlier.get("text") == evaluation.text else None) \
        or calib_seq_len
    stream = token_stream(tokenizer, evaluation.text, evaluation.max_tokens)
    result = {"text": evaluation.text, "tokens": len(stream), "seq_len": seq_len,
              "ppl_before": perplexity(load_model(directory, device=device), stream, seq_len),
              "ppl_after": perplexity(load_model(out, device=device), stream, seq_len)}
    same = (earlier.get("text"), earlier.get("tokens"), earlier.get("seq_len")) == (evaluation.text, len(stream), seq_len)
    if same and "original_ppl" in earlier and earlier["original_ppl"] != result["ppl_before"]:
        result["original_ppl"] = earlier["original_ppl"]
        result["gap_closed"] = (result["ppl_before"] - result["ppl_after"]) / (result["ppl_before"] - earlier["original_ppl"])
    return result
