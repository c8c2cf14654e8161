"""A tiny name → entry registry used by the three seams (families, objectives, methods).

An entry may be registered by where it lives (``"difftune.models.sd:StableDiffusion"``) and is
imported the first time it is looked up, so the names of every family, objective and method are
known without importing torch: ``difftune validate`` checks a config against them instantly.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to entries. Adding a family, objective or method is one ``register`` call."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T | str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register ``entry`` under ``name``."""

        def decorate(entry: T) -> T:
            self._add(name, entry)
            return entry

        return decorate

    def register_lazy(self, name: str, location: str) -> None:
        """Register the object at ``location`` (``"package.module:attribute"``), imported on first use."""
        if ":" not in location:
            raise ValueError(f"{self.kind} {name!r}: expected 'module:attribute', got {location!r}")
        self._add(name, location)

    def _add(self, name: str, entry: T | str) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry

    def get(self, name: str) -> T:
        try:
            entry = self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None
        if isinstance(entry, str):
            module, _, attribute = entry.partition(":")
            entry = getattr(importlib.import_module(module), attribute)
            self._entries[name] = entry
        return entry

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._entries))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
