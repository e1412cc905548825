"""Before anything is loaded: does the run fit, in which mode, and how much may Algorithm 1 cache?

:func:`choose_run` walks the (mode, activations) pairs the options allow, in this order, and takes
the first whose :func:`~cdmoe.memory.estimate.estimate` fits what is free now::

    (whole, memory), (whole, disk), (sequential, memory), (sequential, disk)

``--mode auto`` allows both modes, ``--activations auto`` both places. "Fits" means: the peak on the
compute device is at most ``FIT_FRACTION`` of its free memory (one GPU's, never the sum of several),
the host's need (for a CPU run the same memory) at most ``FIT_FRACTION`` of the available RAM, and
the output and activation files at most the free disk where they go. What is left on the compute
device then sizes Algorithm 1's :class:`~cdmoe.memory.estimate.SearchMemory`: on a GPU larger
token chunks (up to ``MAX_WORK``, fewer expert calls), then the expert-output cache (up to half of
what remains). If nothing fits, a one-line error names what is short and by how much, for the
most economical pair allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import CdmoeError
from ..models.budget import ModelParams
from .estimate import Estimate, RunShape, SearchMemory, estimate

__all__ = ["FIT_FRACTION", "Free", "RunChoice", "choose_run", "free_now"]

FIT_FRACTION = 0.9
MIN_WORK = 256 * 2**20
MAX_WORK = 4 * 2**30
GiB = 2**30


@dataclass(frozen=True)
class Free:
    """Free bytes now: on the compute device (a CPU run: the host's), in host RAM, on the disk of the
    output and on the disk of ``--activations disk``."""

    device: int
    host: int
    disk: int
    activation_disk: int
    device_name: str = "cpu"


@dataclass(frozen=True)
class RunChoice:
    mode: str
    activations: str
    search: SearchMemory
    estimate: Estimate
    why: str
    fits: bool | None = True  # None: free memory unknown

    def to_dict(self) -> dict:
        return {"mode": self.mode, "activations": self.activations, "why": self.why, "fits": self.fits,
                "work_bytes": self.search.work_bytes, "cache_bytes": self.search.cache_bytes, **self.estimate.to_dict()}


def free_now(device, out: str | Path, activations_dir: str | Path | None = None) -> Free:
    """What is free for a run on torch device ``device`` writing ``out``."""
    from .devices import available_bytes, disk_free_bytes, host_available_bytes

    disk = disk_free_bytes(Path(out).parent if Path(out).name else out)
    return Free(device=available_bytes(device), host=host_available_bytes(), disk=disk,
                activation_disk=disk_free_bytes(activations_dir) if activations_dir is not None else disk,
                device_name=str(device))


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def shortfalls(est: Estimate, free: Free, on_cpu: bool) -> list[str]:
    """What ``est`` lacks in ``free``, one phrase each (empty: it fits)."""
    out = []
    checks = [("host RAM", est.host_need_bytes / FIT_FRACTION, free.host)]
    if not on_cpu:
        checks.insert(0, (f"GPU {free.device_name}", est.peak_device_bytes / FIT_FRACTION, free.device))
    if free.disk == free.activation_disk:
        checks.append(("disk", est.disk_bytes, free.disk))
    else:
        checks += [("disk of --out", est.output_bytes, free.disk),
                   ("disk of --activations-dir", est.activation_disk_bytes, free.activation_disk)]
    for what, need, have in checks:
        if need > have:
            out.append(f"{what} needs {_gib(need)}, {_gib(have)} free ({_gib(need - have)} short)")
    return out


def _sized(params: ModelParams, run: RunShape, est: Estimate, free: Free, on_cpu: bool) -> RunShape:
    """``run`` with Algorithm 1's budgets grown into what ``free`` leaves beside ``est``."""
    spare = FIT_FRACTION * (free.host if on_cpu else free.device) - (est.host_need_bytes if on_cpu else est.peak_device_bytes)
    spare = max(0, int(spare))
    work = run.search.work_bytes if on_cpu else min(MAX_WORK, max(run.search.work_bytes, spare // 8))
    moe = max(params.layers, key=lambda lp: lp.num_experts)
    full = moe.num_experts * run.tokens * params.hidden_size * run.compute_bytes
    cache = min(full, max(0, (spare - (work - run.search.work_bytes)) // 2))
    return replace(run, search=SearchMemory(work_bytes=work, cache_bytes=cache))


def choose_run(params: ModelParams, base: RunShape, mode: str, activations: str, free: Free | None,
               check: bool = True) -> RunChoice:
    """The run to do: ``mode`` / ``activations`` (each ``auto`` or a fixed choice) that fits ``free``
    (None: unknown, the first pair allowed with default budgets). ``check=False`` never refuses: when
    nothing fits it takes the most economical pair."""
    modes = ("whole", "sequential") if mode == "auto" else (mode,)
    places = ("memory", "disk") if activations == "auto" else (activations,)
    on_cpu = base.device == "cpu"
    last = None
    for m in modes:
        for a in places:
            run = replace(base, mode=m, activations=a, search=SearchMemory(work_bytes=MIN_WORK, cache_bytes=0))
            est = estimate(params, run)
            if free is None:
                run = replace(run, search=SearchMemory())
                return RunChoice(m, a, run.search, estimate(params, run), "free memory unknown", fits=None)
            short = shortfalls(est, free, on_cpu)
            last = (run, est, short)
            if not short:
                run = _sized(params, run, est, free, on_cpu)
                est = estimate(params, run)
                where = "host RAM" if on_cpu else f"GPU {free.device_name}"
                why = (f"estimated peak {_gib(est.peak_device_bytes)} of {_gib(free.device)} free on {where}"
                       + ("" if on_cpu else f", {_gib(est.host_need_bytes)} of {_gib(free.host)} host RAM"))
                return RunChoice(m, a, run.search, est, why)
    run, est, short = last
    if not check:
        return RunChoice(run.mode, run.activations, run.search, est, "does not fit: " + "; ".join(short), fits=False)
    raise CdmoeError(f"not enough memory for --mode {run.mode} --activations {run.activations}: {'; '.join(short)}. "
                     "Lower --samples or --seq-len, free memory or disk, or allow --mode auto / --activations auto "
                     "(cdmoe plan MODEL --layers N --json shows every phase; --no-memory-check tries anyway)")
