"""Optional dependencies, checked before any work: one line naming what needs the package and how to install it.

The packages are looked up (``importlib.util.find_spec``), not imported, so the check is cheap
enough to run first in every command that will need them.
"""

from __future__ import annotations

import importlib.util
import sys

from ..errors import CdmoeError

__all__ = ["EXTRAS", "require"]

# import name -> (pip package, cdmoe extra that installs it)
EXTRAS = {"bitsandbytes": ("bitsandbytes", "quant"), "compressed_tensors": ("compressed-tensors", "quant"),
          "lm_eval": ("lm-eval", "eval"), "peft": ("peft", "finetune")}


def _installed(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None  # None: imports of it are blocked
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, needed_by: str) -> None:
    """Fail (one line) if ``module`` is not installed; ``needed_by`` names the option or method that needs it."""
    if not _installed(module):
        package, extra = EXTRAS[module]
        raise CdmoeError(f"{needed_by} needs {package}, which is not installed; pip install 'cdmoe[{extra}]' "
                         f"(or pip install {package})")
