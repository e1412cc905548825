"""The one rule for every path cdmoe writes: outputs, checkpoints, reports, measurements, temporary files.

:func:`check_write_path`, called before any heavy work, refuses (one line naming the option):

- the current directory or a parent of it;
- an input, a path inside an input, or a directory containing one, ``--force`` or not (``avoid``:
  other paths the same run writes, e.g. ``--out`` for ``--checkpoint-dir``, are kept apart the same way);
- a path under a file;
- an existing file, unless ``--force`` (``kind="file"``);
- an existing directory (``kind="dir"``), unless ``--force`` and it is an output cdmoe wrote: its
  manifest :data:`MANIFEST_NAME` (written when the output was completed) is valid and lists every file
  in it. A directory holding anything else (a user's file, a ``cdmoe.json`` cdmoe did not write there)
  is never replaced;
- an existing directory cdmoe works in and deletes afterwards (``kind="work"``: checkpoints, partial
  outputs) that does not carry cdmoe's work marker :data:`WORK_MARKER`.

``kind="parent"`` checks a directory in which cdmoe only creates fresh work directories of its own
(``--activations-dir``): it may exist and hold anything, and lie around an input, never in one.

Work directories are made by :func:`claim_work_dir` / :func:`new_work_dir` / :func:`work_dir` (with the
marker) and deleted by :func:`remove_work_dir`, which deletes nothing that lacks the marker.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import CdmoeError

__all__ = ["MANIFEST_NAME", "WORK_MARKER", "check_write_path", "claim_work_dir", "is_work_dir", "mark_work_dir",
           "new_work_dir", "output_problem", "remove_work_dir", "resolved", "work_dir", "write_manifest"]

MANIFEST_NAME = ".cdmoe-output.json"  # in every completed output directory: the files cdmoe wrote there
WORK_MARKER = ".cdmoe-work"  # in every directory cdmoe creates to work in and deletes when done
_MANIFEST_FORMAT = 1


def resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _overlap(a: Path, b: Path) -> str | None:
    """How ``a`` relates to ``b``: "is", "lies inside", "contains", or None."""
    if a == b:
        return "is"
    if b in a.parents:
        return "lies inside"
    if a in b.parents:
        return "contains"
    return None


def _local(item) -> bool:
    return item is not None and str(item) != "" and Path(str(item)).expanduser().exists()


def check_write_path(path: str | Path, *, option: str = "--out", inputs: Iterable = (), force: bool = False,
                     kind: str = "dir", avoid: Iterable = ()) -> Path:
    """Fail fast (one line) if cdmoe writing ``path`` could destroy or change anything; return it resolved.

    ``kind``: ``dir`` (an output directory), ``file`` (a result file), ``work`` (a directory cdmoe
    works in and deletes) or ``parent`` (where cdmoe creates fresh work directories). ``inputs``: what
    the command reads (names that are not local paths, such as hub ids, are skipped); ``avoid``: other
    paths the run writes (checked whether they exist or not).
    """
    target = resolved(path)
    cwd = Path.cwd().resolve()
    if kind != "parent" and (target == cwd or target in cwd.parents):
        where = "the current directory" if target == cwd else "a parent of the current directory"
        raise CdmoeError(f"{option} {path} is {where}; choose a new path for it")
    for item, what in [*((i, "the input") for i in inputs if _local(i)),
                       *((a, "the output") for a in avoid if a is not None)]:
        how = _overlap(target, resolved(item))
        if how and not (kind == "parent" and how == "contains"):
            raise CdmoeError(f"{option} {path} {how} {what} {item}; choose a path outside every input and output")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CdmoeError(f"{option} {path}: {parent} is a file, not a directory; choose another {option}")
            break
    if not target.exists() and not target.is_symlink():
        return target
    if kind == "file":
        if target.is_dir():
            raise CdmoeError(f"{option} {path} is a directory; pass a file path such as {Path(path) / 'result.json'}")
        if not force:
            raise CdmoeError(f"{path} already exists; choose another {option} or pass --force to replace it")
        return target
    if kind == "parent" and target.is_dir():
        return target
    if not target.is_dir() or target.is_symlink():
        raise CdmoeError(f"{option} {path} is a file; choose a directory path for {option}")
    if kind == "work":
        if not is_work_dir(target):
            raise CdmoeError(f"{option} {path} exists and cdmoe did not create it (no {WORK_MARKER}); cdmoe deletes "
                             f"this directory when done, so choose a new path for {option}")
        return target
    if not force:
        raise CdmoeError(f"output directory {path} already exists; choose another {option} or pass --force to "
                         "replace it")
    problem = output_problem(target)
    if problem:
        raise CdmoeError(f"--force replaces only directories cdmoe wrote, and {path} {problem}; remove it yourself "
                         f"or choose another {option}")
    return target


def _files(directory: Path) -> list[str]:
    """Every file (and link) under ``directory``, relative, links not followed."""
    found = []
    for root, dirs, files in os.walk(directory):
        base = Path(root).relative_to(directory)
        found += [(base / name).as_posix() for name in files + [d for d in dirs if (Path(root) / d).is_symlink()]]
    return sorted(found)


def write_manifest(directory: Path) -> None:
    """List every file of the completed output ``directory`` in its manifest."""
    files = [f for f in _files(directory) if f != MANIFEST_NAME]
    (directory / MANIFEST_NAME).write_text(json.dumps({"cdmoe_output": _MANIFEST_FORMAT, "files": files}) + "\n")


def output_problem(directory: Path) -> str | None:
    """Why ``directory`` is not an output cdmoe wrote (None: it is, and holds nothing else)."""
    try:
        data = json.loads((directory / MANIFEST_NAME).read_text("utf-8"))
    except FileNotFoundError:
        return f"holds no {MANIFEST_NAME} (the list of the files cdmoe wrote there)"
    except (OSError, ValueError):
        return f"has a {MANIFEST_NAME} that is not valid"
    if not (isinstance(data, dict) and data.get("cdmoe_output") == _MANIFEST_FORMAT
            and isinstance(data.get("files"), list)):
        return f"has a {MANIFEST_NAME} that is not valid"
    extra = [f for f in _files(directory) if f != MANIFEST_NAME and f not in set(data["files"])]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        return f"holds {extra[0]}{more}, which cdmoe did not write there"
    return None


def is_work_dir(directory: Path) -> bool:
    """Whether ``directory`` carries cdmoe's work marker."""
    try:
        return json.loads((Path(directory) / WORK_MARKER).read_text("utf-8")).get("cdmoe_work_dir") == 1
    except (OSError, ValueError, AttributeError):
        return False


def mark_work_dir(directory: Path, purpose: str) -> None:
    """Put cdmoe's work marker into ``directory`` (which cdmoe created)."""
    (directory / WORK_MARKER).write_text(json.dumps({"cdmoe_work_dir": 1, "purpose": purpose,
                                                     "pid": os.getpid()}) + "\n")


def claim_work_dir(directory: str | Path, purpose: str, option: str = "--out") -> Path:
    """Create ``directory`` with the work marker, or take it if it already carries one."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True)
    except FileExistsError:
        if not is_work_dir(directory):
            raise CdmoeError(f"{directory} exists and cdmoe did not create it (no {WORK_MARKER}); remove it or "
                             f"choose another {option}") from None
        return directory
    except OSError as err:
        raise CdmoeError(f"cannot create {directory} for {option} ({err.strerror}); choose a writable "
                         "location") from None
    mark_work_dir(directory, purpose)
    return directory


def new_work_dir(parent: str | Path | None, prefix: str, purpose: str) -> Path:
    """A fresh directory (``prefix`` + random) in ``parent`` (default: the system's temporary directory), marked."""
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    mark_work_dir(directory, purpose)
    return directory


def remove_work_dir(directory: str | Path) -> bool:
    """Delete ``directory`` if it carries cdmoe's work marker (and only then); return whether it did."""
    directory = Path(directory)
    if directory.is_symlink() or not is_work_dir(directory):
        return False
    shutil.rmtree(directory, ignore_errors=True)
    return True


@contextlib.contextmanager
def work_dir(prefix: str, purpose: str, parent: str | Path | None = None) -> Iterator[Path]:
    """A fresh marked directory for the block, deleted after it."""
    directory = new_work_dir(parent, prefix, purpose)
    try:
        yield directory
    finally:
        remove_work_dir(directory)
