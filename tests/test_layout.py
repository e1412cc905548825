"""The package layout shows the pipeline, and imports run one way through it.

Stages, lowest first (a module may import its own stage and lower ones, never a higher or a
sibling one): io -> models -> memory -> search -> evaluation | checkpoint -> methods ->
comparison -> the interfaces (cli, the one-call API in ``oneshot``) -> the package's exports. Every import is
checked, including the ones inside functions (kept there only to make ``cdmoe --help`` light).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "cdmoe"

RANK = {
    "errors": 0, "_version": 0,
    "io": 1,
    "models": 2,
    "memory": 3,
    "search": 4,
    "evaluation": 5, "checkpoint": 5,
    "methods": 6,
    "comparison": 7,
    "cli": 8, "oneshot": 8,
    "__init__": 9, "__main__": 9,  # the package exports the one-call API; ``python -m cdmoe`` runs the cli
}
MAX_LINES = 350
SELF_CONTAINED = "models/modeling_cdmoe.py"  # copied into every output: torch and transformers only


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _stage(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _cdmoe_imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted module) of every cdmoe module ``path`` imports, anywhere in the file."""
    rel = path.relative_to(SRC).with_suffix("")
    package = ["cdmoe", *rel.parts[:-1]]  # the package the module is in (for relative imports)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "cdmoe"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "cdmoe":
                continue
            if target == "cdmoe" or not node.module and node.level:  # `from . import x`: x is a module of target
                found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


def _stage_of_module(dotted: str) -> str:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_belongs_to_a_stage():
    assert {_stage(p) for p in _modules()} <= set(RANK), "a new top-level module or package needs a place in RANK"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_run_one_way(path):
    stage = _stage(path)
    wrong = []
    for line, target in _cdmoe_imports(path):
        other = _stage_of_module(target)
        if other != stage and not RANK[other] < RANK[stage]:
            wrong.append(f"line {line}: {target} ({other}, rank {RANK[other]})")
    assert not wrong, f"{path.relative_to(SRC)} ({stage}, rank {RANK[stage]}) imports upwards or sideways: {wrong}"


def test_shipped_modelling_file_is_self_contained():
    path = SRC / SELF_CONTAINED
    assert _cdmoe_imports(path) == []
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import would not resolve inside an output directory"
            roots.add(node.module.split(".")[0])
    assert roots <= {"__future__", "inspect", "shutil", "pathlib", "torch", "transformers"}, roots


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_modules_are_short_and_say_what_they_hold(path):
    text = path.read_text()
    limit = MAX_LINES if str(path.relative_to(SRC)) != SELF_CONTAINED else 400  # one file, copied into every output
    assert len(text.splitlines()) <= limit, f"{path.relative_to(SRC)} has over {limit} lines: split it"
    assert path.name == "__main__.py" or ast.get_docstring(ast.parse(text)), "a module docstring saying what it holds"


def test_the_checker_sees_a_violation(tmp_path):
    """The checker itself: an upward import inside a function of a models module is found."""
    bad = SRC / "models" / "_layout_probe.py"
    try:
        bad.write_text('"""probe"""\n\n\ndef f():\n    from ..comparison import compare  # noqa: F401\n')
        assert _cdmoe_imports(bad) == [(5, "cdmoe.comparison")]
        with pytest.raises(AssertionError, match="imports upwards"):
            test_imports_run_one_way(bad)
    finally:
        bad.unlink()
