"""One ``trust_remote_code`` decision per command, passed to every load.

A checkpoint may ship Python files (``auto_map`` in its config.json). Loading it with
``trust_remote_code=True`` runs them. cdmoe never does that unless the user asked: the CLI's
``--trust-remote-code`` (or ``trust_remote_code=True`` in the Python API) sets this for the
whole command, and every config, model and tokenizer load reads it from :func:`trusted`.
Without it, a checkpoint whose family transformers has natively (DeepSeek-V2-Lite, V3 and R1
ship an ``auto_map`` too) is loaded with transformers' own class, and one that only its own
code can load is refused with a one-line error saying so.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from ..errors import CdmoeError

__all__ = ["remote_code_error", "trust_remote_code", "trusted"]

_TRUST = contextvars.ContextVar("cdmoe_trust_remote_code", default=False)


def trusted() -> bool:
    """Whether the running command may execute code shipped inside a checkpoint."""
    return _TRUST.get()


@contextlib.contextmanager
def trust_remote_code(value: bool) -> Iterator[None]:
    """Within this block, loads run checkpoint code iff ``value``."""
    token = _TRUST.set(bool(value))
    try:
        yield
    finally:
        _TRUST.reset(token)


def remote_code_error(path, err: Exception) -> CdmoeError | None:
    """The one-line error for a load that needed the checkpoint's own code (None: another problem)."""
    text = str(err)
    if "trust_remote_code" not in text:
        return None
    return CdmoeError(f"{path} needs the Python code it ships (auto_map in its config.json), and transformers has no "
                      "class of its own for it; pass --trust-remote-code (trust_remote_code=True in Python) if you "
                      "trust that code")
