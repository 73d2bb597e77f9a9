"""Named factories: one registration holds a name, its help text and the factory that builds it.

    COUPLINGS: Registry[Coupling] = Registry("coupling")
    COUPLINGS.register("sinkhorn", "entropic minibatch OT", SinkhornCoupling)

    @COUPLINGS.register("independent", "product coupling")
    class IndependentCoupling: ...

``build(name, **params)`` checks the name, then binds ``params`` to the factory's signature before calling it:
an unknown name or parameter is one ValueError. A registry acts as the tuple of its names for ``in``, iteration
and ``len`` (so argparse ``choices=`` and ``tuple(...)`` take it). Imports nothing from fastfm: any layer may use it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
_KEYWORDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registration: the name, a one-line help text and the factory."""

    name: str
    help: str
    factory: Callable[..., T]


class Registry(Generic[T]):
    """Factories of one ``kind`` ("path", "coupling", ...) by name, in registration order.

    ``supplied`` names parameters that the building code passes itself (a data set's seed): they are left out of
    ``params`` and ``help_text``.
    """

    def __init__(self, kind: str, *, supplied: tuple[str, ...] = ()) -> None:
        self.kind, self.supplied = kind, supplied
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, help: str, factory: F | None = None) -> Any:
        """Register ``factory`` under ``name``; without ``factory``, a decorator that registers what it decorates."""
        if factory is None:
            return lambda f: self.register(name, help, f)
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = Entry(name, help, factory)
        return factory

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"

    def entry(self, name: str) -> Entry[T]:
        """The registration of ``name``; ValueError naming the valid ones if there is none."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self._entries)}")
        return self._entries[name]

    def params(self, name: str) -> dict[str, Any]:
        """The factory's keyword parameters with their defaults (``inspect.Parameter.empty`` where required)."""
        sig = inspect.signature(self.entry(name).factory)
        return {p.name: p.default for p in sig.parameters.values() if p.kind in _KEYWORDS and p.name not in self.supplied}

    def check(self, name: str, **params: Any) -> None:
        """ValueError unless ``name`` is registered and its factory takes ``params`` (nothing is built)."""
        try:
            inspect.signature(self.entry(name).factory).bind(**params)
        except TypeError as e:
            raise ValueError(f"bad parameters for {self.kind} {name!r}: {e}; it takes "
                             f"{_signature(self.params(name)) or 'no parameters'}") from None

    def build(self, name: str, **params: Any) -> T:
        """``factory(**params)`` of ``name``, after :meth:`check`."""
        self.check(name, **params)
        return self._entries[name].factory(**params)

    def help_text(self) -> str:
        """Every name with its parameters and help: "a (x=1): help of a; b: help of b"."""
        def one(e: Entry[T]) -> str:
            sig = _signature(self.params(e.name))
            return f"{e.name}{f' ({sig})' if sig else ''}: {e.help}"
        return "; ".join(one(e) for e in self._entries.values())


def _signature(params: dict[str, Any]) -> str:
    """"x, y=1.0": required parameters bare, the others with their defaults."""
    return ", ".join(k if v is inspect.Parameter.empty else f"{k}={v!r}" for k, v in params.items())
