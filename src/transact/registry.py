"""Plug-in registries (model families, salience metrics, correctors): a name maps to one object, and
every module of the plug-in's package is imported the first time the registry is read, so adding a
plug-in is adding one file. Unknown names are errors that list the known ones, never a fallback."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Generic, TypeVar

from transact.errors import TransactError

T = TypeVar("T")


def _default_unknown(kind: str) -> Callable[[str, tuple[str, ...]], str]:
    return lambda name, known: f"{kind} {name!r} is unknown; choose one of {', '.join(known)}"


class Registry(Generic[T]):
    """Items of one kind by name, filled by the modules of ``package`` as they are imported."""

    def __init__(self, kind: str, package: str, key: Callable[[T], str], *, first: str | None = None,
                 unknown: Callable[[str, tuple[str, ...]], str] | None = None) -> None:
        self.kind, self.package, self.key, self.first = kind, package, key, first
        self._unknown = unknown or _default_unknown(kind)
        self._items: dict[str, T] = {}
        self._discovered = False

    def register(self, item: T) -> T:
        """Add ``item`` under its name (a module of the plug-in package calls this when imported)."""
        name = self.key(item)
        if name in self._items and self._items[name] is not item:
            raise ValueError(f"two {self.kind}s are registered as {name!r}")
        self._items[name] = item
        return item

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        package = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def names(self) -> tuple[str, ...]:
        """Every registered name: ``first`` (the default) first, then alphabetically."""
        self._discover()
        return tuple(sorted(self._items, key=lambda n: (n != self.first, n)))

    def get(self, name: str) -> T:
        self._discover()
        try:
            return self._items[name]
        except KeyError:
            raise TransactError(self._unknown(name, self.names())) from None

    def items(self) -> list[tuple[str, T]]:
        return [(name, self._items[name]) for name in self.names()]
