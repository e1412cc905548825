"""``cdmoe sweep``: several N from one calibration and one greedy layer order.

The greedy order for N+1 layers extends the order for N (Algorithm 2 is greedy), so one
search for the largest N gives every point of the curve: point N condenses the first N
layers of that order. Each point is written as its own output directory, then a report.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..checkpoint.record import condense_layers
from ..checkpoint.writer import atomic_output_dir, check_output_dir, save
from ..errors import CdmoeError
from ..evaluation.perplexity import perplexity, token_limit, token_stream
from ..methods.condense import EvalOptions
from ..models.input_checks import check_inputs
from ..models.loading import load_model, load_tokenizer, round_to_checkpoint_dtype
from ..models.placement import resolve_device
from ..search.calibration import CalibSpec, load_calibration
from ..search.run import SearchOptions, run_search
from .report import build_report

__all__ = ["sweep"]


def sweep(model: str | Path, out: str | Path, layer_counts: list[int], search: SearchOptions,
          calib: CalibSpec = CalibSpec(), evaluation: EvalOptions = EvalOptions(), dtype: str = "auto",
          force: bool = False, progress=None, device: str = "auto") -> dict:
    """Condense every N in ``layer_counts`` from one search (computed on ``device``); write ``out/layers-N``
    and ``out/report``. One model is in memory at a time."""
    counts = sorted(set(layer_counts))
    if not counts or counts[0] < 1:
        raise CdmoeError("--layers must list positive layer counts, e.g. 1,2,4")
    out = Path(out)
    search.check()
    resolve_device(device)
    token_limit(evaluation.max_tokens)
    check_inputs(model, calib, {"--eval-text": evaluation.text})
    inputs = (model, calib.source, evaluation.text)
    check_output_dir(out, force, inputs)
    tokenizer = load_tokenizer(model)
    calib_ids = load_calibration(tokenizer, calib)  # an unreadable source is refused before the weights load
    base = load_model(model, dtype=dtype, device=device)
    result = run_search(base, calib_ids, replace(search, layers=counts[-1]), progress)
    stream = token_stream(tokenizer, evaluation.text, evaluation.max_tokens) if evaluation.text else None
    original_ppl = perplexity(base, stream, evaluation.seq_len or calib.seq_len) if stream is not None else None
    del base
    with atomic_output_dir(out, force, inputs=inputs) as work:  # nothing at ``out`` until every point and the report
        report = _write_points(model, work, counts, result, calib, calib_ids, tokenizer, stream, evaluation,
                               original_ppl, dtype, device)
        for row in report["rows"]:  # name the points where they will be, not in the working directory
            row["dir"] = str(out / Path(row["dir"]).name)
        (work / "report" / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (work / "sweep.json").write_text(json.dumps({"model": str(model), "layers": counts,
                                                      "points": [f"layers-{n}" for n in counts]}, indent=2) + "\n")
    return report


def _write_points(model, work: Path, counts, result, calib, calib_ids, tokenizer, stream, evaluation, original_ppl,
                  dtype, device) -> dict:
    """Write ``work/layers-N`` for every N and ``work/report``; return the report."""
    seq_len = evaluation.seq_len or calib.seq_len
    dirs = []
    for n in counts:
        point = load_model(model, dtype=dtype, device=device)
        search_record = {**result.record, "layer_order": result.record["layer_order"][:n],
                         "layer_step_scores": result.record["layer_step_scores"][:n],
                         "calibration": {**calib.to_dict(), "tokens": int(calib_ids.numel())}, "sweep": counts}
        record = condense_layers(point, result.choices[:n], base_model=str(model), search=search_record)
        storage = round_to_checkpoint_dtype(point, model, dtype)  # evaluate what will be saved
        if stream is not None:
            record["evaluation"] = {"text": evaluation.text, "tokens": len(stream), "seq_len": seq_len,
                                    "original_ppl": original_ppl, "condensed_ppl": perplexity(point, stream, seq_len)}
        dirs.append(save(point, work / f"layers-{n}", record, tokenizer=tokenizer, storage=storage))
    return build_report(dirs, work / "report")
