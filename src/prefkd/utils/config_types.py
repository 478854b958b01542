"""What a config value may be, in words and as a test: the small type vocabulary of :mod:`prefkd.utils.config_schema`.

An annotation is one of ``int``, ``float``, ``bool``, ``str``, ``None``, ``typing.Any``, ``Literal[...]``, a union
(``int | None``), ``list[T]`` or ``dict[str, T]``. ``float`` accepts integers too (``lr=1``); ``int`` and ``float``
never accept ``true``/``false``. A key's :class:`Limits` (``ge``/``gt``/``le``/``lt``, a list's ``length`` or
``nonempty``, a string ``pattern``) narrow what its numbers, lists and strings may be. :func:`from_hint` turns the
type hints of a function's parameters (``str | Path``, ``Sequence[int] | None``, ``dict | None``) into this
vocabulary: paths are strings, sequences lists, mappings dicts, anything else (a tensor dtype, a class) goes unchecked.
"""

from __future__ import annotations

import collections.abc
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Literal, Union

from omegaconf import DictConfig, ListConfig


@dataclass(frozen=True)
class Limits:
    """The range of a number (``ge`` ≤ x, ``gt`` < x, x ≤ ``le``, x < ``lt``), the size of a list (``length``
    exactly, or ``nonempty``) and the form of a string (``pattern``, a full-match regex, described by ``form``)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    length: int | None = None
    nonempty: bool = False
    pattern: str | None = None
    form: str | None = None


NO_LIMITS = Limits()


def arms(annotation) -> tuple:
    """The alternatives of a union (``int | None`` -> ``(int, NoneType)``); anything else is its own only arm."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def is_number(value, whole: bool = False) -> bool:
    return isinstance(value, int if whole else (int, float)) and not isinstance(value, bool)


def in_range(value, limits: Limits) -> bool:
    return ((limits.ge is None or value >= limits.ge) and (limits.gt is None or value > limits.gt)
            and (limits.le is None or value <= limits.le) and (limits.lt is None or value < limits.lt))


def accepts(annotation, value, limits: Limits = NO_LIMITS) -> bool:
    """Whether ``value`` (a plain value, or an OmegaConf list/dict node) is one ``annotation`` allows."""
    if annotation is Any:
        return True
    if annotation is None or annotation is type(None):
        return value is None
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(accepts(arm, value, limits) for arm in typing.get_args(annotation))
    if origin is Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(annotation))
    if annotation is bool:
        return isinstance(value, bool)
    if annotation in (int, float):
        return is_number(value, whole=annotation is int) and in_range(value, limits)
    if annotation is str:
        return isinstance(value, str) and (limits.pattern is None or re.fullmatch(limits.pattern, value) is not None)
    if annotation is list or origin is list:
        if not isinstance(value, (list, tuple, ListConfig)):
            return False
        if (limits.length is not None and len(value) != limits.length) or (limits.nonempty and not value):
            return False
        item = (typing.get_args(annotation) or (Any,))[0]
        return all(accepts(item, v) for v in value)
    if annotation is dict or origin is dict:
        if not isinstance(value, (dict, DictConfig)):
            return False
        item = (typing.get_args(annotation) or (str, Any))[1]
        return all(accepts(item, v) for v in value.values())
    raise TypeError(f"prefkd.utils.config_types cannot check values against {annotation!r}")


def _range(limits: Limits) -> str:
    low = (f"[{limits.ge:g}" if limits.ge is not None else f"({limits.gt:g}" if limits.gt is not None else None)
    high = (f"{limits.le:g}]" if limits.le is not None else f"{limits.lt:g})" if limits.lt is not None else None)
    if low and high:
        return f" in {low}, {high}"
    if low:
        return f" {'≥' if low[0] == '[' else '>'} {low[1:]}"
    if high:
        return f" {'≤' if high[-1] == ']' else '<'} {high[:-1]}"
    return ""


def describe(annotation, limits: Limits = NO_LIMITS, plural: bool = False) -> str:
    """``annotation`` in words: ``an integer ≥ 1 or null``, ``one of cosine, linear, constant``, ``a list of 2
    numbers``."""
    if annotation is Any:
        return "any value"
    if annotation is None or annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        words = [describe(arm, limits, plural) for arm in typing.get_args(annotation) if arm is not type(None)]
        return " or ".join(words + (["null"] if type(None) in typing.get_args(annotation) else []))
    if origin is Literal:
        return "one of " + ", ".join(str(choice) for choice in typing.get_args(annotation))
    if annotation is bool:
        return "true or false"
    if annotation in (int, float):
        noun = ("integers" if plural else "an integer") if annotation is int else ("numbers" if plural else "a number")
        return noun + _range(limits)
    if annotation is str:
        return limits.form or ("strings" if plural else "a string")
    if annotation is list or origin is list:
        item = (typing.get_args(annotation) or (Any,))[0]
        size = f"{limits.length} " if limits.length is not None else ""
        items = "" if item is Any else f" of {size}{describe(item, plural=True)}"
        return f"a {'non-empty ' if limits.nonempty else ''}list{items or (f' of {size}items' if size else '')}"
    if annotation is dict or origin is dict:
        item = (typing.get_args(annotation) or (str, Any))[1]
        return "a mapping" + ("" if item is Any else f" to {describe(item, plural=True)}")
    return repr(annotation)


def from_hint(hint) -> Any:
    """A function parameter's type hint in this vocabulary (``Any`` where it cannot be checked)."""
    if hint is None or hint is type(None):
        return type(None)
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        converted = [from_hint(arm) for arm in typing.get_args(hint)]
        return Any if Any in converted else Union[tuple(converted)]  # noqa: UP007 (built at run time)
    if origin is Literal or hint in (bool, int, float, str, Any):
        return hint
    if hint in (list, tuple, set) or origin in (list, tuple, set, collections.abc.Sequence, collections.abc.Iterable,
                                                collections.abc.Collection) or hint is collections.abc.Sequence:
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return list[from_hint(args[0])] if len(set(args)) == 1 else list
    if hint is dict or origin in (dict, collections.abc.Mapping) or hint is collections.abc.Mapping:
        return dict
    if isinstance(hint, type) and issubclass(hint, (PurePath, os.PathLike)):
        return str
    return Any
