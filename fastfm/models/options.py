"""Checks of a model's constructor options (``--model-args``, a run's model.json) against the constructor's
annotations and limits: a wrong value is one ValueError naming the option, the value and what is expected."""

from __future__ import annotations

import functools
import inspect
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

Init = TypeVar("Init", bound=Callable[..., None])
_KINDS = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
          bool: ("true or false", "booleans"), type(None): ("null", "nulls")}


@dataclass(frozen=True)
class Limit:
    """The numbers ``lo <= v < hi`` (of a list option: its items, at least ``min_items`` of them)."""

    lo: float
    hi: float = math.inf
    min_items: int = 0

    def __str__(self) -> str:
        return f">= {self.lo:g}" if self.hi == math.inf else f"in [{self.lo:g}, {self.hi:g})"


POSITIVE = Limit(1)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _fits(value: Any, hint: Any, limit: Limit | None) -> bool:
    """Whether ``value`` is of the annotated type ``hint`` (int counts as float, bool not as int) within ``limit``."""
    if _is_union(hint):
        return any(_fits(value, h, limit) for h in typing.get_args(hint))
    if typing.get_origin(hint) is Sequence:
        return (isinstance(value, (list, tuple)) and len(value) >= (limit.min_items if limit else 0)
                and all(_fits(v, typing.get_args(hint)[0], limit) for v in value))
    if hint in (int, float):
        number = isinstance(value, int) or (hint is float and isinstance(value, float))
        return (number and not isinstance(value, bool) and math.isfinite(value)
                and (limit is None or limit.lo <= value < limit.hi))
    return isinstance(value, hint)


def _describe(hint: Any, limit: Limit | None, plural: bool = False) -> str:
    """What ``_fits`` accepts, in words: "a non-empty list of integers >= 1", "an integer >= 1 or null"."""
    if _is_union(hint):
        return " or ".join(_describe(h, limit, plural) for h in typing.get_args(hint))
    if typing.get_origin(hint) is Sequence:
        return (f"a {'non-empty ' if limit and limit.min_items else ''}list of "
                f"{_describe(typing.get_args(hint)[0], limit, plural=True)}")
    words = _KINDS[hint][plural]
    return f"{words} {limit}" if limit and hint in (int, float) else words


def checked_options(model: str, limits: dict[str, Limit]) -> Callable[[Init], Init]:
    """Decorator of a model's ``__init__``: before it runs, every argument must fit its annotation and its entry in
    ``limits``, else ValueError "``model`` model option NAME=VALUE: expected WHAT"."""
    def decorate(init: Init) -> Init:
        signature, hints = inspect.signature(init), typing.get_type_hints(init)

        @functools.wraps(init)
        def checked(self: Any, *args: Any, **kwargs: Any) -> None:
            for name, value in signature.bind(self, *args, **kwargs).arguments.items():
                if name in hints and not _fits(value, hints[name], limits.get(name)):
                    raise ValueError(f"{model} model option {name}={value!r}: expected "
                                     f"{_describe(hints[name], limits.get(name))}")
            init(self, *args, **kwargs)

        return typing.cast(Init, checked)

    return decorate
