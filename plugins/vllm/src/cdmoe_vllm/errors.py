"""The plugin's one error type and its two kinds of message.

Every refusal is one line starting ``cdmoe-vllm:``, naming the directory, the problem and the fix.
:class:`CdmoeVllmError` is deliberately *not* a ``ValueError``: vLLM 0.32 reads the config inside
its ``ModelConfig``, a pydantic dataclass, which turns a ``ValueError`` into a three-line
``ValidationError`` (the line in the middle, among pydantic's own); any other exception reaches
the caller (``LLM(...)``, ``vllm serve``) as it is.
"""

from __future__ import annotations

__all__ = ["CdmoeVllmError", "SUPPORTED_FAMILIES", "REWRITE", "RECOPY", "malformed", "unsupported"]

SUPPORTED_FAMILIES = ("deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "glm4_moe")
REWRITE = "write the directory again with cdmoe (condense, apply or baseline)"
RECOPY = "copy it again from where cdmoe wrote it, or write it again with cdmoe"


class CdmoeVllmError(Exception):
    """A condensed checkpoint this plugin cannot serve (the message is one line)."""


def _where(where: str | None) -> str:
    return f"{where}: " if where else ""


def unsupported(what: str, where: str | None = None) -> CdmoeVllmError:
    """Something cdmoe writes but vLLM cannot serve exactly: the message names what it serves."""
    return CdmoeVllmError(f"cdmoe-vllm: {_where(where)}{what}; vLLM serves condensed checkpoints (unquantised, or "
                          f"compressed-tensors w8a8/w4a16/fp8) of the families {', '.join(SUPPORTED_FAMILIES)}")


def malformed(what: str, where: str | None = None, fix: str = REWRITE) -> CdmoeVllmError:
    """A directory that is not what cdmoe writes (edited, truncated, half copied)."""
    return CdmoeVllmError(f"cdmoe-vllm: {_where(where)}{what}; {fix}")
