"""No command destroys or replaces data it did not write (issues #15 point 8, #19 points 1-4).

Each case runs the CLI as a user would and checks the one-line error (exit 2), that nothing
the user had changed, and that no partial directory is left unless it holds search progress.
"""

import errno
import hashlib
import json
import os
import subprocess
import sys

import pytest
from conftest import DEMO_CALIB, DEMO_TEXT
from typer.testing import CliRunner

from cdmoe.cli import app
from cdmoe.io.output_dir import partial_dir

runner = CliRunner()
CALIB = ["--calib", str(DEMO_CALIB), "--samples", "4", "--seq-len", "16", "--quiet"]


def tree_digest(path):
    """sha256 over every file's relative name and bytes under ``path``."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def condense(model, out, *extra):
    return runner.invoke(app, ["condense", str(model), "--out", str(out), "--layers", "1", *CALIB, *extra])


def refused(result, message):
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output


@pytest.fixture
def user_dir(tmp_path):
    """A directory holding a user's files, as the current directory."""
    path = tmp_path / "work"
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    (path / "data").mkdir()
    (path / "data" / "x.bin").write_bytes(b"\x00\x01")
    return path


def test_out_dot_with_force_does_not_touch_the_current_directory(tiny_model_dir, user_dir, monkeypatch):
    monkeypatch.chdir(user_dir)
    before = tree_digest(user_dir)
    refused(condense(tiny_model_dir, ".", "--force"), "is the current directory")
    refused(condense(tiny_model_dir, "..", "--force"), "a parent of the current directory")
    assert tree_digest(user_dir) == before and sorted(os.listdir(user_dir.parent)) == ["work"]


@pytest.mark.parametrize("where", ["model", "inside", "calib", "eval"])
def test_out_that_is_or_lies_in_an_input_is_refused_even_with_force(tiny_model_dir, tmp_path, where):
    before = tree_digest(tiny_model_dir)
    out = {"model": tiny_model_dir, "inside": tiny_model_dir / "condensed", "calib": DEMO_CALIB,
           "eval": DEMO_TEXT}[where]
    result = condense(tiny_model_dir, out, "--force", "--eval-text", str(DEMO_TEXT))
    refused(result, "the input")
    assert tree_digest(tiny_model_dir) == before
    assert not (tiny_model_dir / "condensed").exists()


def test_force_replaces_only_a_directory_cdmoe_wrote(tiny_model_dir, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    refused(condense(tiny_model_dir, mine, "--force"), "replaces only directories cdmoe wrote")
    assert (mine / "thesis.tex").read_text() == "years of work"
    out = tmp_path / "out"
    assert condense(tiny_model_dir, out).exit_code == 0
    assert condense(tiny_model_dir, out, "--force").exit_code == 0  # its own output: replaced


def test_output_parent_that_is_a_file_and_output_that_is_a_file(tiny_model_dir, tmp_path):
    (tmp_path / "afile").write_text("x")
    refused(condense(tiny_model_dir, tmp_path / "afile" / "out"), "is a file, not a directory")
    refused(condense(tiny_model_dir, tmp_path / "afile"), "is a file")
    assert (tmp_path / "afile").read_text() == "x"


HOLDER = """
import sys
from cdmoe.io.output_dir import atomic_output_dir
with atomic_output_dir(sys.argv[1]) as work:  # what every writing command holds while it works
    (work / "cdmoe.json").write_text('{"first": true}')
    print("holding", flush=True)
    sys.stdin.readline()  # until the test lets it finish
"""


def test_a_second_run_into_the_same_output_stops(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "holding", first.stderr.read()[-2000:]
        refused(condense(tiny_model_dir, out), f"another cdmoe run (pid {first.pid}) is writing")
        refused(condense(tiny_model_dir, out, "--force"), f"another cdmoe run (pid {first.pid}) is writing")
    finally:
        first.communicate("\n", timeout=60)
    assert first.returncode == 0
    assert json.loads((out / "cdmoe.json").read_text()) == {"first": True}  # the first run's output, untouched
    assert not partial_dir(out).exists()


def test_eval_and_measure_write_where_out_says_never_into_the_model(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = tree_digest(tiny_model_dir)
    args = ["eval", str(tiny_model_dir), "--tasks", "none", "--ppl-text", str(DEMO_TEXT), "--ppl-tokens", "200",
            "--ppl-seq-len", "32"]
    assert runner.invoke(app, args).exit_code == 0
    assert json.loads((tmp_path / "eval.json").read_text())["model"] == str(tiny_model_dir)
    refused(runner.invoke(app, args), "already exists")  # never replaced silently
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    result = runner.invoke(app, ["measure", str(tiny_model_dir), str(tiny_model_dir), "--repeats", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "memory.json").exists()
    assert tree_digest(tiny_model_dir) == before


def test_a_full_disk_during_condense_says_the_run_can_be_resumed(tiny_model_dir, tmp_path, monkeypatch):
    import cdmoe.methods.condense as condense_run

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(condense_run, "write_condensed", full)
    out = tmp_path / "out"
    result = condense(tiny_model_dir, out)
    refused(result, "no space left on the device")
    assert "rerun the same command to resume" in result.output
    assert not out.exists() and (partial_dir(out) / "state").exists()
    monkeypatch.undo()
    resumed = condense(tiny_model_dir, out)
    assert resumed.exit_code == 0, resumed.output
    assert (out / "cdmoe.json").exists() and not partial_dir(out).exists()


def test_a_sweep_that_fails_midway_leaves_no_half_written_root(tiny_model_dir, tmp_path, monkeypatch):
    import cdmoe.comparison.sweep as sweep_module

    real_save, saved = sweep_module.save, []

    def save_then_fill_the_disk(*args, **kwargs):
        if saved:
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(real_save(*args, **kwargs))
        return saved[-1]

    monkeypatch.setattr(sweep_module, "save", save_then_fill_the_disk)
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["sweep", str(tiny_model_dir), "--out", str(out), "--layers", "1,2", *CALIB[:-1]])
    refused(result, "no space left on the device")
    assert saved and not out.exists() and not partial_dir(out).exists()


def test_an_unwritable_output_location_is_one_line(tiny_model_dir, tmp_path, monkeypatch):
    """As root, permissions do not bite; a read-only location is simulated where cdmoe creates its directory."""
    from pathlib import Path

    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.name.endswith(".partial"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    out = tmp_path / "ro" / "out"
    refused(condense(tiny_model_dir, out), "choose a writable location")
    assert not out.exists()


def test_output_files_get_the_umask_modes(tiny_model_dir, tmp_path):
    """transformers writes safetensors shards through a 0600 temporary file; the output is readable as any new file."""
    out = tmp_path / "out"
    assert condense(tiny_model_dir, out).exit_code == 0
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~mask}


# --- issue #28: one rule for every path cdmoe writes -------------------------------------------------------------


@pytest.fixture(scope="module")
def condensed(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("condensed") / "out"
    assert condense(tiny_model_dir, out).exit_code == 0
    return out


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    from cdmoe.search.calibration import read_documents

    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text("\n\n".join(read_documents(DEMO_TEXT)[:40]))
    return path


@pytest.mark.parametrize("where", ["current directory", "the input", "another model"])
def test_finetune_checkpoint_dir_is_never_one_cdmoe_did_not_create(condensed, small_text, user_dir, tiny_model_dir,
                                                                    tmp_path, monkeypatch, where):
    """--checkpoint-dir ., the input condensed directory or another model's directory: all were deleted on success.
    Now refused before any work (the tokenizer is not even loaded)."""
    import shutil

    import cdmoe.methods.finetune

    def no_work(*args, **kwargs):
        raise AssertionError("work started before --checkpoint-dir was checked")

    monkeypatch.setattr(cdmoe.methods.finetune, "load_tokenizer", no_work)
    monkeypatch.chdir(user_dir)
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    target = {"current directory": ".", "the input": str(condensed), "another model": str(other)}[where]
    before = {p: tree_digest(p) for p in (user_dir, condensed, other)}
    out = tmp_path / "ft"
    result = runner.invoke(app, ["finetune", str(condensed), "--data", str(small_text), "--out", str(out),
                                 "--steps", "1", "--seq-len", "16", "--batch-size", "2", "--quiet",
                                 "--checkpoint-dir", target])
    message = {"current directory": "is the current directory", "the input": "is the input",
               "another model": "cdmoe did not create it"}[where]
    refused(result, message)
    assert {p: tree_digest(p) for p in before} == before
    assert not out.exists() and not partial_dir(out).exists()


def test_finetune_removes_only_its_own_checkpoint_dir(condensed, small_text, tmp_path):
    """The checkpoint directory cdmoe made (with its marker) is removed on success; a file the user put
    into it since is never deleted with it."""
    out, checkpoints = tmp_path / "ft", tmp_path / "ckpt"
    args = ["finetune", str(condensed), "--data", str(small_text), "--out", str(out), "--steps", "1",
            "--seq-len", "16", "--batch-size", "2", "--quiet", "--checkpoint-dir", str(checkpoints)]
    assert runner.invoke(app, args).exit_code == 0
    assert out.is_dir() and not checkpoints.exists()
    checkpoints.mkdir()  # made by the user this time: no marker
    refused(runner.invoke(app, [*args[:5], str(tmp_path / "ft2"), *args[6:]]), "cdmoe did not create it")
    assert checkpoints.is_dir()


@pytest.mark.parametrize("where", ["RUN", "RUN/plots"])
def test_report_never_writes_into_a_run_it_reads(condensed, tmp_path, where):
    before = tree_digest(condensed)
    out = condensed if where == "RUN" else condensed / "plots"
    refused(runner.invoke(app, ["report", str(condensed), "--out", str(out)]), "the input")
    assert tree_digest(condensed) == before


def test_report_is_an_output_directory_replaced_only_with_force(condensed, tmp_path):
    out = tmp_path / "report"
    assert runner.invoke(app, ["report", str(condensed), "--out", str(out)]).exit_code == 0
    assert json.loads((out / "report.json").read_text())["rows"][0]["dir"] == str(condensed)
    refused(runner.invoke(app, ["report", str(condensed), "--out", str(out)]), "already exists")
    (out / "mine.txt").write_text("notes")
    refused(runner.invoke(app, ["report", str(condensed), "--out", str(out), "--force"]), "holds mine.txt")
    (out / "mine.txt").unlink()
    assert runner.invoke(app, ["report", str(condensed), "--out", str(out), "--force"]).exit_code == 0


@pytest.mark.parametrize("command", ["measure", "eval"])
def test_result_files_are_never_written_inside_an_input_even_with_force(condensed, tiny_model_dir, command):
    before = tree_digest(condensed)
    for out in (condensed / "cdmoe.json", condensed / "new" / "result.json"):
        args = (["measure", str(tiny_model_dir), str(condensed), "--repeats", "1"] if command == "measure" else
                ["eval", str(condensed), "--tasks", "none", "--ppl-text", str(DEMO_TEXT), "--ppl-tokens", "100",
                 "--ppl-seq-len", "32"])
        refused(runner.invoke(app, [*args, "--out", str(out), "--force"]), "lies inside the input")
    assert tree_digest(condensed) == before


def _sweep(model, out, *extra):
    return runner.invoke(app, ["sweep", str(model), "--out", str(out), "--layers", "1", *CALIB[:-1], *extra])


def _compare(model, out, *extra):
    return runner.invoke(app, ["compare", str(model), "--out", str(out), "--budget", "0.9", "--methods",
                               "layer-drop", *CALIB[:-1], *extra])


WRITERS = {"condense": condense, "sweep": _sweep, "compare": _compare}


@pytest.mark.parametrize("command", list(WRITERS))
def test_force_needs_an_output_cdmoe_wrote_not_a_file_named_like_its_marker(tiny_model_dir, tmp_path, command):
    """A directory with a `{}` cdmoe.json (or compare.json, sweep.json) beside a user's thesis.tex was deleted
    by --force; so was any file a user had added to a real output."""
    write = WRITERS[command]
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("cdmoe.json", "compare.json", "sweep.json"):
        (mine / name).write_text("{}")
    (mine / "thesis.tex").write_text("years of work")
    before = tree_digest(mine)
    refused(write(tiny_model_dir, mine, "--force"), "replaces only directories cdmoe wrote")
    assert tree_digest(mine) == before

    out = tmp_path / "out"
    assert write(tiny_model_dir, out).exit_code == 0
    (out / "thesis.tex").write_text("years of work")  # added by the user to cdmoe's output
    refused(write(tiny_model_dir, out, "--force"), "holds thesis.tex")
    assert (out / "thesis.tex").read_text() == "years of work"
    (out / "thesis.tex").unlink()
    assert write(tiny_model_dir, out, "--force").exit_code == 0  # cdmoe's own output, and only that: replaced


def test_activations_dir_is_never_inside_an_input(tiny_model_dir, tmp_path):
    """--activations-dir MODEL/sub made MODEL/sub inside the model (and left it there)."""
    before = tree_digest(tiny_model_dir)
    out = tmp_path / "out"
    refused(condense(tiny_model_dir, out, "--activations", "disk", "--activations-dir", str(tiny_model_dir / "sub")),
            "lies inside the input")
    refused(condense(tiny_model_dir, out, "--activations", "disk", "--activations-dir", str(out)), "is the output")
    assert tree_digest(tiny_model_dir) == before and not (tiny_model_dir / "sub").exists()
    assert not out.exists() and not partial_dir(out).exists()


def _baseline(model, out):
    return runner.invoke(app, ["baseline", "layer-drop", str(model), "--out", str(out), "--layers", "1", *CALIB[:-1]])


@pytest.mark.parametrize("command", ["condense", "sweep", "compare", "baseline"])
def test_a_full_disk_while_saving_weights_is_one_line(tiny_model_dir, tmp_path, monkeypatch, command):
    """safetensors reports a full disk as SafetensorError('... No space left on device (os error 28)'), not OSError."""
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    out = tmp_path / "out"
    write = {**WRITERS, "baseline": _baseline}[command]
    refused(write(tiny_model_dir, out), "no space left on the device")
    assert not out.exists()
    assert partial_dir(out).exists() == (command == "condense")  # only condense keeps resumable progress


def test_cdmoe_deletes_only_directories_carrying_its_marker(tmp_path):
    """The one deleter of work directories: a directory without cdmoe's marker (a user's, or one named like
    cdmoe's) is never deleted; one cdmoe made is, with its contents."""
    from cdmoe.io.write_rule import WORK_MARKER, new_work_dir, remove_work_dir, work_dir

    mine = tmp_path / "cdmoe-activations-mine"
    mine.mkdir()
    (mine / "data.bin").write_bytes(b"\x00")
    (mine / WORK_MARKER).write_text("{}")  # a marker file cdmoe did not write
    assert remove_work_dir(mine) is False and (mine / "data.bin").exists()
    made = new_work_dir(tmp_path, "cdmoe-activations-", "test")
    (made / "x.safetensors").write_bytes(b"\x00")
    assert made.parent == tmp_path and remove_work_dir(made) is True and not made.exists()
    with work_dir("cdmoe-tasks-", "test") as scratch:
        (scratch / "task.yaml").write_text("x")
    assert not scratch.exists()
