"""vLLM plugin for cdmoe condensed checkpoints (``model_type: "cdmoe"``).

Installed next to vLLM (``pip install ./plugins/vllm``), it registers through the
``vllm.general_plugins`` entry point, so ``LLM(model=out_dir)`` and ``vllm serve out_dir``
load a condensed directory with no extra flag and without running code from the
directory:

* :mod:`cdmoe_vllm.config` registers a config class for ``cdmoe`` with transformers'
  ``AutoConfig`` (a registered local class wins over the directory's ``auto_map`` even
  with ``trust_remote_code=True``); it returns the *family's* config (``model_type``
  ``deepseek_v2``, ...) carrying the ``cdmoe`` entry, with ``architectures`` naming this
  plugin's model class for the family;
* :mod:`cdmoe_vllm.models` holds one model class per family: a subclass of vLLM's own
  ``*ForCausalLM`` whose condensed layers hold a dense SwiGLU MLP of the condensed width.

A directory it cannot serve exactly is refused in one line (:mod:`cdmoe_vllm.errors`): while vLLM
reads the config, a malformed ``cdmoe`` entry (:mod:`cdmoe_vllm.spec`) or incomplete weight files
(:mod:`cdmoe_vllm.files`); after loading, a parameter no checkpoint tensor wrote (:mod:`cdmoe_vllm.loaded`).

The plugin imports only vLLM, torch and transformers (not cdmoe).
"""

from __future__ import annotations

__all__ = ["register", "SUPPORTED_FAMILIES"]

from .config import SUPPORTED_FAMILIES


def register() -> None:
    """Entry point of ``vllm.general_plugins``: runs in every vLLM process, maybe twice."""
    from vllm import ModelRegistry

    from .config import ARCHITECTURES, register_config

    register_config()
    for arch in sorted(set(ARCHITECTURES.values())):
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"cdmoe_vllm.models:{arch}")
