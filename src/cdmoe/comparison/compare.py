"""``cdmoe compare``: CD-MoE, its ablations and the baselines at matched memory budgets.

A memory budget (weights on disk / original's) is a ceiling: each method gets the setting of
its knob (N condensed or dropped layers, E' experts per layer) with the largest *predicted*
ratio that does not exceed it (none, and a table row saying so, when even its smallest setting
is over); quantisation-only methods have one setting. The table shows each point's *measured*
ratio and marks it **over** when the written bytes exceed the budget. Every point is written as
a normal output directory, reloaded from disk as a user would, and scored the same way: held-out
perplexity, optional lm-eval tasks, prefill speed relative to the original (timed in the
same run, interleaved), the measured ratio of weight bytes and, optionally, peak resident
memory loading and running it (a fresh process per point, :func:`cdmoe.evaluation.measure.peak_rss`). One calibration set and one
statistics pass serve all methods; CD-MoE variants run one search each (the greedy order
for N layers is a prefix of the order for more).

Method names: ``cd-moe`` (greedy experts K = top-k and layers), ``cd-moe-s`` (shared
experts only), ``cd-moe:VARIANT`` with VARIANT an expert selector (random, l1,
pl-alpha-hill, frequency), a layer selector (layer-rank, global-layer-rank) or a metric
(kl, ppl); ``layer-drop``, ``block-drop``, ``expert-drop``, ``reap``, ``msmoe`` (E' is the average over
layers), ``msmoe-restricted``; ``slim-SCHEME`` (quantisation alone) and any structural method with
``+SCHEME`` appended (condense or drop, then quantise), SCHEME one of ``w8a8``, ``w4a16``, ``fp8``
(compressed-tensors, vLLM's format) or ``int8``, ``int4`` (bitsandbytes): ``cd-moe+w8a8``, ``slim-w4a16``;
``cd-moe+heal``, ``cd-moe-s+heal`` (and any ``cd-moe`` variant with ``+heal``): condense,
then heal the condensed layers on the same calibration windows (:mod:`cdmoe.methods.heal`, default options).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.record import condense_layers
from ..checkpoint.writer import atomic_output_dir, check_output_dir, save, write_condensed
from ..errors import CdmoeError
from ..evaluation.lmeval import check_tasks
from ..evaluation.measure import disk_bytes, peak_rss
from ..evaluation.perplexity import perplexity, token_limit, token_stream
from ..io.write_rule import work_dir
from ..methods.baselines import BaselineOptions, apply_baseline, baseline_record, finish_quantized
from ..methods.budget_plan import apply_budget_plan, check_budget_source, plan_budgets, plan_summary
from ..methods.calib_stats import calibration_stats
from ..methods.heal import HealOptions, heal_directory
from ..methods.quantize import check_quantize
from ..models.budget import model_params
from ..models.input_checks import check_inputs
from ..models.loading import load_model, load_tokenizer, round_to_checkpoint_dtype
from ..models.placement import resolve_device
from ..search.calibration import CalibSpec, load_calibration
from ..search.plan_run import PlanOptions
from ..search.run import SearchOptions, run_search
from .budgets import ABLATION_METHODS, DEFAULT_METHODS, Method, candidate_ratios, largest_fitting, parse_methods

__all__ = ["DEFAULT_METHODS", "ABLATION_METHODS", "Method", "parse_methods", "compare"]

def _prefill_seconds(models: dict[str, torch.nn.Module], prompts: torch.Tensor, repeats: int = 3) -> dict[str, float]:
    """Median prefill time of each model, the models interleaved in every repeat (a GPU is synchronised
    around each pass, so the time is the computation's, not the launch's)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            ids = prompts.to(next(model.parameters()).device)
            _synchronize(ids.device)
            start = time.perf_counter()
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
            _synchronize(ids.device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(model: str | Path, out: str | Path, budgets: list[float], methods: list[Method],
            calib: CalibSpec = CalibSpec(), eval_text: str | None = None, eval_tokens: int = 50_000,
            tasks: str | None = None, task_text: str | None = None, dtype: str = "auto", force: bool = False,
            measure_rss: bool = False, task_batch_size: int = 32, progress=print, device: str = "auto") -> dict:
    """Run ``methods`` at each budget on ``model`` (computed on ``device``); write ``out/compare.{json,md,png}``
    and the points. One model is in memory at a time, except while a point's prefill speed is timed against
    the original (two)."""
    if not budgets or not all(0 < b <= 1 for b in budgets):
        raise CdmoeError("--budget takes memory ratios in (0, 1], e.g. 0.8,0.6")
    resolve_device(device)
    out = Path(out)
    token_limit(eval_tokens)
    for method in methods:  # every optional package the run will need, before any point is computed
        check_quantize(method.quantize, f"{method.name} in --methods")
    check_tasks(tasks, task_text)
    check_inputs(model, calib, {"--eval-text": eval_text, "--task-text": task_text})
    if any(m.base == "budget" for m in methods):
        check_budget_source(model)
    for scheme in sorted({m.quantize for m in methods if m.quantize}):
        check_quantize(scheme, model=model)  # fits the model's widths
    inputs = (model, calib.source, eval_text, task_text)
    check_output_dir(out, force, inputs)
    tokenizer = load_tokenizer(model)
    calib_ids = load_calibration(tokenizer, calib)  # an unreadable source is refused before the weights load
    base = load_model(model, dtype=dtype, device=device)
    params = model_params(base)
    stats = calibration_stats(base, calib_ids, reap=any(m.base == "reap" for m in methods))
    del base  # every point loads its own copy
    first = params.layers[0]
    plan: dict[tuple[str, int], dict] = {}
    unfit: list[dict] = []  # (method, budget) pairs where even the smallest setting is over the budget
    for method in methods:
        if method.base == "budget":  # planned for each budget: its knob is the budget (in permille)
            for budget in budgets:
                plan[(method.name, round(1000 * budget))] = {"method": method, "knob": round(1000 * budget),
                                                             "budgets": [budget], "predicted_ratio": budget}
            continue
        cands = candidate_ratios(method, params, stats, first.top_k, first.num_experts)
        for budget in budgets:
            knob = largest_fitting(cands, budget)
            if knob is None:
                smallest = min(cands.values(), default=None)
                unfit.append({"method": method.name, "budget": budget, "smallest_predicted_ratio": smallest})
                progress(f"[compare] {method.name}: no setting fits {100 * budget:.0f}%"
                         + (f" (smallest predicted {100 * smallest:.1f}%)" if smallest is not None else ""))
                continue
            point = plan.setdefault((method.name, knob), {"method": method, "knob": knob, "budgets": [],
                                                          "predicted_ratio": cands[knob]})
            point["budgets"].append(budget)

    with atomic_output_dir(out, force, inputs=inputs) as work:  # nothing at ``out`` until every point is written and scored
        _run_points(model, work, plan, calib_ids, tokenizer, stats, dtype, progress, calib, device)
        scorer = _Scorer(tokenizer, token_stream(tokenizer, eval_text, eval_tokens) if eval_text else None,
                         calib.seq_len, tasks, task_text, task_batch_size, dtype if measure_rss else None, device)
        rows = _evaluate(model, work, plan, scorer, dtype, progress, device)
        result = {"model": str(model), "budgets": budgets, "calibration": calib.to_dict(), "eval_text": eval_text,
                  "eval_tokens": eval_tokens, "tasks": tasks, "task_batch_size": task_batch_size,
                  "peak_rss_dtype": dtype if measure_rss else None, "rows": rows, "unfit": unfit}
        (work / "compare.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        (work / "compare.md").write_text(markdown_table(result))
        plot_compare(result, work / "compare.png")
    result["plot"] = str(out / "compare.png")
    return result


def _run_points(model, work: Path, plan: dict, calib_ids, tokenizer, stats, dtype, progress, calib: CalibSpec,
                device) -> None:
    """Write every planned point to ``work/points/...`` (its ``dir`` is relative to ``work``). CD-MoE
    variants with the same search options (``cd-moe``, ``cd-moe+heal``, ``cd-moe+int4``) share one search, and
    ``budget`` and ``budget+heal`` one planner run."""
    searches: dict[str, object] = {}
    for (name, knob), point in plan.items():
        method: Method = point["method"]
        planner = f"budget+{method.quantize}" if method.quantize else "budget"  # a scheme's plans are in its bytes
        if method.base == "budget" and planner not in searches:  # one planner run: all budgets, budget(+heal)
            options = PlanOptions(budgets=tuple(p["budgets"][0] for (n, _), p in plan.items() if n == name))
            searches[planner] = plan_budgets(load_model(model, dtype=dtype, device=device), model, calib_ids,
                                             options, dtype=dtype, quantize=method.quantize)
            planned = searches[planner][0]
            for p in plan.values():
                if p["method"].base == "budget" and p["method"].quantize == method.quantize:
                    p["predicted_ratio"] = planned.predicted[p["budgets"][0]] / planned.record["original_bytes"]
                    p["setting"] = plan_summary(planned.plans[p["budgets"][0]])
        budgets = ", ".join(f"{100 * b:.0f}%" for b in point["budgets"])
        setting = f" ({method.knob}={knob})" if method.knob != "none" else ""
        progress(f"[compare] {name}{setting}: predicted memory {100 * point['predicted_ratio']:.1f}% for budget {budgets}")
        point["dir"] = f"points/{name.replace(':', '_').replace('+', '_')}-{knob}"
        path = work / point["dir"]
        loaded = load_model(model, dtype=dtype, device=device)
        if method.base == "budget":
            planned, table = searches[planner]
            record = {**apply_budget_plan(loaded, model, point["budgets"][0], planned,
                                          {**planned.record, "calibration": {"tokens": int(calib_ids.numel())}}),
                      "variant": name}
        elif method.base == "cd-moe":
            same = json.dumps(method.search, sort_keys=True)
            largest = max(k for (n, k), p in plan.items()
                          if p["method"].base == "cd-moe" and json.dumps(p["method"].search, sort_keys=True) == same)
            if same not in searches:
                searches[same] = run_search(loaded, calib_ids, SearchOptions(layers=largest, **method.search))
            result = searches[same]
            record = condense_layers(loaded, result.choices[:knob], base_model=str(model),
                                     search={**result.record, "layer_order": result.record["layer_order"][:knob]})
            record["variant"] = name
        else:
            options = BaselineOptions(method.base, layers=knob if method.knob == "layers" else None,
                                      keep_experts=knob if method.knob == "keep_experts" else None,
                                      quantize=method.quantize if method.base == "slim" else None)
            loaded, details = apply_baseline(loaded, stats, options)
            record = {**baseline_record(loaded, model, method.base, details), "variant": name}
        storage = round_to_checkpoint_dtype(loaded, model, dtype)
        if method.quantize:
            group = searches[planner][1].group if method.base == "budget" else None  # w4a16: the plan's priced group
            loaded, record["quantization"] = finish_quantized(loaded, method.quantize, storage, group)
        save(loaded, path, record, tokenizer=tokenizer, force=True, storage=storage)
        del loaded
        if method.heal and record.get("condensed"):  # in place, on the same calibration windows, the original again
            progress(f"[compare] healing {name} (N={knob})")
            healed = heal_directory(path, path, record, model, calib_ids, calib.to_dict(), HealOptions(),
                                    mode="whole", device=resolve_device(device), dtype=dtype,
                                    state_dir=work / "heal-state")
            write_condensed(path, healed, lambda d: None)
            shutil.rmtree(work / "heal-state")


@dataclass
class _Scorer:
    """How every point (and the original) is scored: the same text, tasks and settings for all."""

    tokenizer: object
    stream: torch.Tensor | None  # held-out token ids (T,) for perplexity, or None
    seq_len: int
    tasks: str | None
    task_text: str | None
    task_batch_size: int
    rss_dtype: str | None  # dtype to measure peak RSS in, or None to skip
    device: str = "auto"  # where peak memory is measured (a GPU: its peak too)

    def prompts(self) -> torch.Tensor:
        """(4, seq_len) token ids the prefill speed is timed on."""
        ids = self.stream if self.stream is not None else torch.arange(4 * self.seq_len) % self.tokenizer.vocab_size
        return ids[: 4 * self.seq_len].reshape(-1, self.seq_len)[:4]

    def __call__(self, model, path) -> dict:
        from ..evaluation.lmeval import evaluate, resolve_tasks, summarize

        scores: dict = {}
        if self.stream is not None:
            scores["ppl"] = perplexity(model, self.stream, self.seq_len)
        if self.tasks:
            with work_dir("cdmoe-tasks-", "lm-eval task files") as work:
                names, include = resolve_tasks(self.tasks, self.task_text, Path(work))
                scores["tasks"] = summarize(evaluate(model, self.tokenizer, names, include,
                                                     batch_size=self.task_batch_size))
        if self.rss_dtype:
            scores["peak_rss_bytes"] = peak_rss(path, self.rss_dtype, device=self.device)["load_and_run_bytes"]
        return scores


def _evaluate(model, work: Path, plan, scorer: _Scorer, dtype, progress, device) -> list[dict]:
    original = load_model(model, dtype=dtype, device=device)
    prompts = scorer.prompts()
    orig_bytes = disk_bytes(model)
    rows = [{"method": "original", "knob": None, "budgets": [], "dir": str(model), "memory_ratio": 1.0,
             "predicted_ratio": 1.0, "speedup": 1.0, "active_params": model_params(original).active,
             **scorer(original, model)}]
    for point in plan.values():
        progress(f"[compare] evaluating {point['dir'].removeprefix('points/')}")
        path = work / point["dir"]
        loaded = load_model(path, dtype=dtype, device=device)
        times = _prefill_seconds({"original": original, "point": loaded}, prompts)
        record = json.loads((path / "cdmoe.json").read_text())
        ratio = disk_bytes(path) / orig_bytes
        rows.append({"method": point["method"].name, "knob": point["knob"], "knob_name": point["method"].knob,
                     "setting": point.get("setting"),
                     "budgets": point["budgets"], "over_budgets": [b for b in point["budgets"] if ratio > b],
                     "dir": point["dir"], "predicted_ratio": point["predicted_ratio"], "memory_ratio": ratio,
                     "speedup": times["original"] / times["point"],
                     "active_params": record["params"]["condensed_active_params"], **scorer(loaded, path)})
        del loaded
    if scorer.rss_dtype:
        for row in rows:
            row["peak_rss_ratio"] = row["peak_rss_bytes"] / rows[0]["peak_rss_bytes"]
    return rows


def _task_label(task: str) -> str:
    """Column header: the task and its unit (accuracy in %, or word perplexity for rolling tasks)."""
    return f"{task} (word ppl)" if "ppl" in task else f"{task} (%)"


def _average(row: dict) -> float | None:
    acc = [v for k, v in (row.get("tasks") or {}).items() if "ppl" not in k]
    return sum(acc) / len(acc) if acc else None


def markdown_table(result: dict) -> str:
    rows = result["rows"]
    task_names = sorted({t for r in rows for t in (r.get("tasks") or {})})
    rss = all("peak_rss_ratio" in r for r in rows)
    lines = [f"# cdmoe compare: {result['model']}", "",
             "A budget is a ceiling: each method runs its largest setting whose predicted weight bytes fit it. "
             "memory: the measured weight bytes on disk / the original's; **over**: above the budget.", ""]
    if task_names:
        lines += ["average: mean of the accuracy tasks (not the perplexities)", ""]
    for budget in result["budgets"]:
        lines += [f"## Budget {100 * budget:.0f}% of the original weight bytes", "",
                  "| method | setting | activated params | memory (measured) |" + (" peak RSS |" if rss else "")
                  + " speed-up | perplexity |" + "".join(f" {_task_label(t)} |" for t in task_names)
                  + (" average |" if task_names else ""),
                  "|---|---|---|---|" + ("---|" if rss else "") + "---|---|" + "---|" * len(task_names)
                  + ("---|" if task_names else "")]
        for row in [rows[0]] + [r for r in rows[1:] if budget in r["budgets"]]:
            setting = "-" if row["knob"] is None else row["setting"] if row.get("setting") else (
                f"N={row['knob']}" if row.get("knob_name") == "layers" else
                f"E'={row['knob']}" if row.get("knob_name") == "keep_experts" else "-")
            over = " **over**" if budget in row.get("over_budgets", ()) else ""
            cells = [row["method"], setting, f"{row['active_params'] / 1e6:.2f}M",
                     f"{100 * row['memory_ratio']:.1f}%{over}"]
            cells += [f"{100 * row['peak_rss_ratio']:.0f}% ({row['peak_rss_bytes'] / 2**20:.0f} MiB)"] if rss else []
            cells += [f"{row['speedup']:.2f}x", f"{row['ppl']:.2f}" if row.get("ppl") else "-"]
            cells += [f"{row['tasks'][t]:.2f}" if t in (row.get("tasks") or {}) else "-" for t in task_names]
            if task_names:
                avg = _average(row)
                cells.append(f"{avg:.2f}" if avg is not None else "-")
            lines.append("| " + " | ".join(cells) + " |")
        rest = rss + 2 + len(task_names) + bool(task_names)  # cells after the memory column
        for miss in (m for m in result.get("unfit", ()) if m["budget"] == budget):
            smallest = miss["smallest_predicted_ratio"]
            memory = f"smallest setting: {100 * smallest:.1f}% (predicted)" if smallest is not None else "no setting"
            lines.append(f"| {miss['method']} | none fits | - | {memory} |" + " - |" * rest)
        lines.append("")
    return "\n".join(lines)


def plot_compare(result: dict, path: Path) -> Path:
    """Every method's points against measured memory: perplexity, and average accuracy when tasks ran (neither
    scored: the prefill speed-up)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method: dict[str, list[dict]] = {}
    for row in result["rows"]:
        by_method.setdefault(row["method"], []).append(row)
    panels = [(lambda r: r.get("ppl"), "held-out perplexity (lower is better)"),
              (_average, "average accuracy (%, higher is better)")]
    panels = [(value, label) for value, label in panels if any(value(r) is not None for r in result["rows"])] or [
        (lambda r: r.get("speedup"), "prefill speed-up (x; no --eval-text or --tasks: quality not scored)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    markers = "os^vD<>pPX*hH+x"
    for ax, (value, label) in zip(axes[0], panels):
        for i, (name, rows) in enumerate(by_method.items()):
            rows = sorted((r for r in rows if value(r) is not None), key=lambda r: r["memory_ratio"])
            ax.plot([100 * r["memory_ratio"] for r in rows], [value(r) for r in rows],
                    marker=markers[i % len(markers)], label=name)
        ax.set_xlabel("memory (% of original weight bytes, measured)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
