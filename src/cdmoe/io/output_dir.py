"""Output directories and result files that never lose a user's data: checked, locked, written atomically.

Every command that writes a directory goes through :func:`atomic_output_dir`, every result file through
:func:`check_output_file` / :func:`write_output_file`:

- **checked first** by the one rule of :mod:`cdmoe.io.write_rule` (also called before any heavy
  work): never the current directory or a parent of it, never an input or inside or around one, never
  over a file without ``--force``, and an existing directory only with ``--force`` and only if it is an
  output cdmoe wrote (its manifest lists every file in it);
- **locked**: the work happens in ``.OUT.partial/`` beside ``OUT`` (:func:`partial_dir`, a work
  directory carrying cdmoe's marker), on which the run holds an exclusive ``flock`` with its pid in
  ``.OUT.partial/.lock``; a second run into the same ``OUT`` stops with a one-line error naming that pid;
- **atomic**: ``OUT`` appears (renamed from the partial directory, with its manifest) only when
  everything was written; on failure the partial directory is removed, unless it holds resumable search
  progress (``state/``), which a rerun of the same command continues. A full disk says so in one line.
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
from .write_rule import (
    WORK_MARKER,
    check_write_path,
    claim_work_dir,
    is_work_dir,
    mark_work_dir,
    resolved,
    write_manifest,
)

__all__ = ["LOCK_NAME", "STATE_DIR", "atomic_output_dir", "check_output_dir", "check_output_file", "partial_dir",
           "write_error", "write_output_file"]

STATE_DIR = "state"  # resumable search progress inside the partial directory
LOCK_NAME = ".lock"  # the pid of the run holding the partial directory


def check_output_dir(out: str | Path, force: bool = False, inputs: Iterable[str | Path | None] = (),
                     option: str = "--out") -> Path:
    """Fail fast (before any heavy work) if writing the directory ``out`` could destroy data; return it resolved.

    ``inputs``: the paths the command reads (model, record, data files); hub ids and other
    names that are not local paths are ignored.
    """
    return check_write_path(out, option=option, inputs=inputs, force=force, kind="dir")


def partial_dir(out: str | Path) -> Path:
    """The deterministic working directory of a run writing ``out`` (beside it, hidden)."""
    out = resolved(out)
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
        if child.name not in (LOCK_NAME, WORK_MARKER):
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def _usual_modes(directory: Path) -> None:
    """Give the output's files the modes the user's umask gives new files: writers that save through a
    temporary file (transformers' safetensors shards) leave them 0600, unreadable to a team."""
    mask = os.umask(0)
    os.umask(mask)
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~mask)


_FULL_DISK = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")


def write_error(err: BaseException, out, full_disk_hint: str, option: str = "--out") -> CdmoeError | None:
    """The one-line error for a write into ``out`` that the disk or the permissions stopped (None: another error).
    A full disk is recognised also where a library wraps it (safetensors' ``SafetensorError: ... os error 28``)."""
    seen, visited = err, set()
    while seen is not None and id(seen) not in visited:  # the error and the ones it was raised from or during
        visited.add(id(seen))
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT) or any(
                text in str(seen).lower() for text in _FULL_DISK):
            return CdmoeError(f"no space left on the device while writing {out}; {full_disk_hint}")
        if isinstance(seen, PermissionError):
            return CdmoeError(f"cannot write {out} ({seen.strerror}: {seen.filename}); choose a writable {option}")
        seen = seen.__cause__ or seen.__context__
    return None


def _claim_partial(tmp: Path, out, option: str) -> None:
    """Create the partial directory of ``out``, or take one an earlier cdmoe run left (its marker, or,
    from runs before the marker, its lock file or search state)."""
    if tmp.is_dir() and not is_work_dir(tmp) and ((tmp / LOCK_NAME).exists() or (tmp / STATE_DIR).is_dir()):
        mark_work_dir(tmp, "partial output")
    claim_work_dir(tmp, "partial output", option)


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool = False, resumable: bool = False,
                      inputs: Iterable[str | Path | None] = (), option: str = "--out") -> Iterator[Path]:
    """Yield the locked partial directory of ``out``; move it to ``out`` only on success.

    ``resumable``: a search state (``state/``) left by an interrupted run is kept for this run
    (with ``force`` the directory starts empty), kept again if this run fails, and removed before
    the directory becomes ``out``. Without it, the directory always starts empty.
    """
    inputs = list(inputs)
    target = check_output_dir(out, force, inputs, option)
    tmp = partial_dir(target)
    _claim_partial(tmp, out, option)
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
            (tmp / WORK_MARKER).unlink()
            write_manifest(tmp)
            _usual_modes(tmp)
            if target.exists():  # appeared while this run worked, or --force
                check_output_dir(out, force, inputs, option)
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
            friendly = write_error(err, out, hint, option)
            if friendly is not None:
                raise friendly from None
            raise


def check_output_file(out: str | Path, force: bool = False, inputs: Iterable[str | Path | None] = (),
                      option: str = "--out") -> Path:
    """Fail fast if writing the result file ``out`` would write inside an input or replace an existing
    file without ``--force``; return ``out`` resolved. (Commands write result files where ``--out``
    says, by default in the current directory: never into a model directory.)"""
    return check_write_path(out, option=option, inputs=inputs, force=force, kind="file")


def write_output_file(out: str | Path, text: str) -> Path:
    """Write ``text`` to ``out`` atomically (a temporary file beside it, renamed into place)."""
    target = resolved(out)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, target)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        friendly = write_error(err, out, "nothing was written; free some space and rerun")
        if friendly is not None:
            raise friendly from None
        raise
    return target
