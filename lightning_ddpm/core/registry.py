"""One small name -> object table, used by every registry in the library (one error wording for all)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, overload

__all__ = ["Registry"]

T = TypeVar("T")
D = TypeVar("D")  # what a decorator is given and returns unchanged


class Registry(Generic[T]):
    """Named objects of one kind (``"schedule"``, ``"sampler"``, ...), in registration order.

    ``registry.register("name")`` decorates a class or function; ``registry.get("name")`` returns it,
    or raises ``unknown <kind> 'name'; choose one of: a, b, c``. Registering a taken name raises,
    except for the same definition again (a notebook cell run twice, a script that is also imported
    as a module), which replaces the old one.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    @overload
    def register(self, name: str) -> Callable[[D], D]: ...

    @overload
    def register(self, name: str, obj: D) -> D: ...

    def register(self, name: str, obj: Any = None) -> Any:
        """``@registry.register("name")`` on a definition, or ``registry.register("name", obj)``."""

        def add(target: Any) -> Any:
            old = self._entries.get(name)
            if old is not None and not same_definition(old, target):
                raise ValueError(
                    f"{self.kind} name {name!r} is already registered (to {old!r}); "
                    f"registered: {', '.join(self.names())}"
                )
            self._entries[name] = target
            return target

        return add if obj is None else add(obj)

    def get(self, name: str, hint: str = "") -> T:
        """The object registered as ``name``; ``hint`` is appended to the error (e.g. other ways to name one)."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}{hint}")
        return self._entries[name]

    __getitem__ = get

    def build(self, name: str, **options: Any) -> Any:
        """The object registered as ``name``; a registered class is instantiated with those of ``options``
        its constructor takes (so ``hybrid_lambda`` reaches the hybrid loss and no other)."""
        entry = self.get(name)
        if not isinstance(entry, type):
            return entry
        params = inspect.signature(entry).parameters
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        return entry(**{k: v for k, v in options.items() if takes_all or k in params})

    def names(self) -> list[str]:
        return list(self._entries)

    def pop(self, name: str) -> T:
        return self._entries.pop(name)

    def copy(self) -> Registry[T]:
        new = Registry[T](self.kind)
        new._entries = dict(self._entries)
        return new

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


def same_definition(old: Any, new: Any) -> bool:
    """The same class or function defined again: the same qualified name in the same module or source file."""
    if old is new:
        return True
    if getattr(old, "__qualname__", None) is None or old.__qualname__ != getattr(new, "__qualname__", None):
        return False
    if getattr(old, "__module__", None) == getattr(new, "__module__", None):
        return True
    try:
        return inspect.getsourcefile(old) == inspect.getsourcefile(new) is not None
    except TypeError:  # built-ins and C extensions have no source file
        return False
