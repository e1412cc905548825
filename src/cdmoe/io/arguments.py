"""The Python API's argument check: every call of an exported function is checked against its annotations.

:func:`checked` wraps a function so that each argument passed must match the function's type
annotation (``int``, ``float``, ``str | Path``, ``list[float]``, ``tuple[int, ...]``, ``X | None``,
a class such as ``PreTrainedModel``, an option dataclass whose fields are then checked the same way);
a mismatch raises :class:`~cdmoe.errors.CdmoeError` with one message naming the function, the argument
and what it must be (``cdmoe.condense: layers must be an int, got '2' (str)``). Values within the right
type (``layers=0``, ``budgets=[2.0]``) are checked where each function already checks them, before any
work. ``bool`` is not accepted as a number; an ``int`` is accepted where a ``float`` is expected.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import os
import types
import typing
from pathlib import Path

from ..errors import CdmoeError

__all__ = ["checked", "type_problem"]

_NAMES = {int: ("an int", "ints"), float: ("a number", "numbers"), str: ("a str", "strs"),
          bool: ("a bool (True or False)", "bools"), dict: ("a dict", "dicts"),
          Path: ("a path (str or pathlib.Path)", "paths"), type(None): ("None", "Nones")}
_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.Iterable)


def _describe(hint, plural: bool = False) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        named = [a for a in args if a is not type(None) and not (a is str and Path in args)]
        return " or ".join(dict.fromkeys(_describe(a, plural) for a in named)) + (
            " or None" if type(None) in args else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in _SEQUENCES:
        return f"a list of {_describe(args[0], plural=True)}" if args else "a list"
    if origin is not None:
        return _describe(origin, plural)
    if hint in _NAMES:
        return _NAMES[hint][plural]
    module, name = getattr(hint, "__module__", "").split(".")[0], getattr(hint, "__qualname__", str(hint))
    name = name if module in ("builtins", "") else f"{module}.{name}"
    return f"{name} objects" if plural else f"a {name}"


def _matches(value, hint) -> bool:
    if hint is typing.Any or isinstance(hint, (str, typing.TypeVar)):
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return _matches(value, args[0])
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in _SEQUENCES:
        if not isinstance(value, (list, tuple)):
            return False
        items = args[:1] if origin is not tuple or (len(args) == 2 and args[1] is Ellipsis) else args
        if origin is tuple and len(items) > 1:
            return len(value) == len(items) and all(_matches(v, a) for v, a in zip(value, items))
        return all(_matches(v, items[0]) for v in value) if items else True
    if origin is not None:  # dict[str, int], Callable[...], ...: the container type only
        return isinstance(value, origin) if isinstance(origin, type) else True
    if hint is type(None) or hint is None:
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is Path:
        return isinstance(value, (str, os.PathLike))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation this checker does not model


def _shown(value) -> str:
    text = repr(value)
    return (text if len(text) <= 60 else text[:57] + "...") + f" ({type(value).__name__})"


def type_problem(name: str, value, hint) -> str | None:
    """Why ``value`` does not fit ``hint`` (None: it does); an option dataclass is checked field by field."""
    if not _matches(value, hint):
        return f"{name} must be {_describe(hint)}, got {_shown(value)}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        hints = typing.get_type_hints(type(value))
        for field in dataclasses.fields(value):
            problem = field.name in hints and type_problem(f"{name}.{field.name}", getattr(value, field.name),
                                                          hints[field.name])
            if problem:
                return problem
    return None


def checked(fn):
    """``fn`` with every argument checked against its annotations first (see the module docstring)."""
    signature = inspect.signature(fn)
    hints: dict | None = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal hints
        if hints is None:  # resolved on the first call: annotations may name classes imported late
            hints = typing.get_type_hints(fn)
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"cdmoe.{fn.__name__}(): {err}") from None
        for name, value in bound.arguments.items():
            kind = signature.parameters[name].kind
            if name in hints and kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                problem = type_problem(name, value, hints[name])
                if problem:
                    raise CdmoeError(f"cdmoe.{fn.__name__}: {problem}")
        return fn(*args, **kwargs)

    return wrapper
