"""``python -m cdmoe``: the same as the ``cdmoe`` command."""

from .cli import app

app(prog_name="cdmoe")
