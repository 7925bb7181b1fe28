"""A name → object registry whose errors list the valid names and suggest the closest one."""

from __future__ import annotations

import difflib
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """An unknown registry name; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """Names (case-insensitive, ``-`` and ``_`` equivalent) mapped to objects of one kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    @staticmethod
    def _key(name: str) -> str:
        return name.strip().lower().replace("-", "_")

    def add(self, name: str, item: T) -> None:
        self._items[self._key(name)] = item

    def names(self) -> list[str]:
        return list(self._items)

    def canonical(self, name: str) -> str:
        """The registered spelling of ``name``; raises :class:`UnknownNameError` if absent."""
        key = self._key(name)
        if key not in self._items:
            close = difflib.get_close_matches(key, self._items, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnknownNameError(f"unknown {self.kind} {name!r}{hint}; valid: {', '.join(self._items)}")
        return key

    def get(self, name: str) -> T:
        return self._items[self.canonical(name)]
