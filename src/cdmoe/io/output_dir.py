"""Output directories that never lose a user's data: checked, locked, written atomically.

Every command that writes a directory goes through :func:`atomic_output_dir`:

- **checked first** (:func:`check_output_dir`, also called before any heavy work): paths are
  resolved; an output that is, contains or lies inside the model or any other input, or that
  is or contains the current directory, is refused, ``--force`` or not; an existing output is
  replaced only with ``--force`` and only if cdmoe wrote it (it holds one of
  :data:`OUTPUT_MARKERS`); a file in the way or a parent that is a file is refused;
- **locked**: the work happens in ``.OUT.partial/`` beside ``OUT`` (:func:`partial_dir`), on
  which the run holds an exclusive ``flock`` with its pid in ``.OUT.partial/.lock``; a second
  run into the same ``OUT`` stops with a one-line error naming that pid;
- **atomic**: ``OUT`` appears (renamed from the partial directory) only when everything was
  written; on failure the partial directory is removed, unless it holds resumable search
  progress (``state/``), which a rerun of the same command continues. A full disk says so.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import CdmoeError

__all__ = ["LOCK_NAME", "OUTPUT_MARKERS", "STATE_DIR", "atomic_output_dir", "check_output_dir", "check_output_file",
           "check_parents", "partial_dir", "write_output_file"]

STATE_DIR = "state"  # resumable search progress inside the partial directory
LOCK_NAME = ".lock"  # the pid of the run holding the partial directory
OUTPUT_MARKERS = ("cdmoe.json", "compare.json", "sweep.json")  # a directory holding one was written by cdmoe


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _overlap(a: Path, b: Path) -> bool:
    """``a`` is ``b``, contains it or lies inside it."""
    return a == b or a in b.parents or b in a.parents


def check_output_dir(out: str | Path, force: bool = False, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Fail fast (before any heavy work) if writing ``out`` could destroy data; return ``out`` resolved.

    ``inputs``: the paths the command reads (model, record, data files); hub ids and other
    names that are not local paths are ignored.
    """
    target = _resolved(out)
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise CdmoeError(f"--out {out} is {'the current directory' if target == cwd else 'a parent of the current directory'}; "
                         "choose a new directory for the output")
    for item in inputs:
        if item is None or not Path(str(item)).expanduser().exists():
            continue
        source = _resolved(item)
        if _overlap(target, source):
            where = "is" if target == source else ("lies inside" if source in target.parents else "contains")
            raise CdmoeError(f"--out {out} {where} the input {item}; choose an output directory outside every input")
    check_parents(target, out)
    if target.exists():
        if not target.is_dir():
            raise CdmoeError(f"output path {out} is a file; choose a directory path for --out")
        if not force:
            raise CdmoeError(f"output directory {out} already exists; choose another --out or pass --force to replace it")
        if not any((target / name).exists() for name in OUTPUT_MARKERS):
            raise CdmoeError(f"--force replaces only directories cdmoe wrote, and {out} holds no "
                             f"{' / '.join(OUTPUT_MARKERS)}; remove it yourself or choose another --out")
    return target


def check_parents(target: Path, out) -> None:
    """Fail if the nearest existing parent of ``target`` is a file."""
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CdmoeError(f"--out {out}: {parent} is a file, not a directory; choose another --out")
            return


def partial_dir(out: str | Path) -> Path:
    """The deterministic working directory of a run writing ``out`` (beside it, hidden)."""
    out = _resolved(out)
    return out.parent / f".{out.name}.partial"


@contextlib.contextmanager
def _locked(directory: Path, out) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (with this pid in its ``.lock``) for the block."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = (directory / LOCK_NAME).read_text().strip() if (directory / LOCK_NAME).exists() else "?"
            raise CdmoeError(f"another cdmoe run (pid {holder}) is writing {out}; wait for it to finish or choose "
                             "another --out") from None
        yield
    finally:
        os.close(fd)


def _clear(directory: Path) -> None:
    for child in directory.iterdir():
        if child.name != LOCK_NAME:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def _usual_modes(directory: Path) -> None:
    """Give the output's files the modes the user's umask gives new files: writers that save through a
    temporary file (transformers' safetensors shards) leave them 0600, unreadable to a team."""
    mask = os.umask(0)
    os.umask(mask)
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~mask)


def _write_error(err: BaseException, out, full_disk_hint: str) -> CdmoeError | None:
    """The one-line error for a write into ``out`` that the disk or the permissions stopped (None: another error)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return CdmoeError(f"no space left on the device while writing {out}; {full_disk_hint}")
    if isinstance(err, PermissionError):
        return CdmoeError(f"cannot write {out} ({err.strerror}: {err.filename}); choose a writable --out")
    return None


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool = False, resumable: bool = False,
                      inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Yield the locked partial directory of ``out``; move it to ``out`` only on success.

    ``resumable``: a search state (``state/``) left by an interrupted run is kept for this run
    (with ``force`` the directory starts empty), kept again if this run fails, and removed before
    the directory becomes ``out``. Without it, the directory always starts empty.
    """
    inputs = list(inputs)
    target = check_output_dir(out, force, inputs)
    tmp = partial_dir(target)
    try:
        tmp.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CdmoeError(f"cannot create {tmp} for --out {out} ({err.strerror}); choose a writable location") from None
    with _locked(tmp, out):
        keep = resumable and not force and (tmp / STATE_DIR).exists()
        if not keep:
            _clear(tmp)  # --force, or leftovers without progress worth keeping
        (tmp / LOCK_NAME).write_text(f"{os.getpid()}\n")
        try:
            yield tmp
            if resumable:
                shutil.rmtree(tmp / STATE_DIR, ignore_errors=True)
            (tmp / LOCK_NAME).unlink()
            _usual_modes(tmp)
            if target.exists():  # appeared while this run worked, or --force
                check_output_dir(out, force, inputs)
                shutil.rmtree(target)
            tmp.rename(target)
        except BaseException as err:
            kept = resumable and (tmp / STATE_DIR).exists()
            if not kept:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                (tmp / LOCK_NAME).unlink(missing_ok=True)
            hint = (f"the search progress is kept in {tmp}: free some space and rerun the same command to resume"
                    if kept else "nothing was written; free some space and rerun")
            friendly = _write_error(err, out, hint)
            if friendly is not None:
                raise friendly from None
            raise


def check_output_file(out: str | Path, force: bool = False, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Fail fast if writing the result file ``out`` would replace an input, or an existing file
    without ``--force``; return ``out`` resolved. (Commands write result files where ``--out``
    says, by default in the current directory: never into a model directory unasked.)"""
    target = _resolved(out)
    for item in inputs:
        if item is not None and Path(str(item)).expanduser().exists() and target == _resolved(item):
            raise CdmoeError(f"--out {out} is the input {item}; choose another --out")
    if target.is_dir():
        raise CdmoeError(f"--out {out} is a directory; pass a file path such as {Path(out) / 'result.json'}")
    check_parents(target, out)
    if target.exists() and not force:
        raise CdmoeError(f"{out} already exists; choose another --out or pass --force to replace it")
    return target


def write_output_file(out: str | Path, text: str) -> Path:
    """Write ``text`` to ``out`` atomically (a temporary file beside it, renamed into place)."""
    target = _resolved(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    try:
        tmp.write_text(text)
        os.replace(tmp, target)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        friendly = _write_error(err, out, "free some space and rerun")
        if friendly is not None:
            raise friendly from None
        raise
    return target
