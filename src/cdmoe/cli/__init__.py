"""The ``cdmoe`` command line (typer). Each command mirrors a function of the Python API (:mod:`cdmoe.oneshot`).

One module per command group; the table below registers the commands in the order ``cdmoe --help`` lists them.
"""

from __future__ import annotations

import sys

import typer

from .baselines import baseline, compare
from .condense import apply, condense, finetune, print_summary, sweep
from .evaluate import eval_cmd, measure, report
from .heal import heal
from .plan import plan

__all__ = ["app", "main", "print_summary"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Condense Mixture-of-Experts models (CD-MoE).")
app.command()(plan)
app.command()(apply)
app.command()(condense)
app.command()(baseline)
app.command()(compare)
app.command()(finetune)
app.command()(heal)
app.command(name="eval")(eval_cmd)
app.command()(sweep)
app.command()(measure)
app.command()(report)


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
