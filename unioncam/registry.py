"""A name → object registry whose errors list the valid names and suggest the closest one, and
:func:`parse_names`, the one parser of name lists (method and metric names)."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


def name_key(name: str) -> str:
    """The comparison key of a name: stripped, lower case, ``-`` read as ``_``."""
    return name.strip().lower().replace("-", "_")


def _did_you_mean(key: str, spellings: dict[str, str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``spellings``' keys (shown in its spelling), or ""."""
    close = difflib.get_close_matches(key, list(spellings), n=1)
    return f" (did you mean {spellings[close[0]]!r}?)" if close else ""


class UnknownNameError(KeyError, ValueError):
    """An unknown registry name; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """Names (case-insensitive, ``-`` and ``_`` equivalent) mapped to objects of one kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, tuple[str, T]] = {}  # key -> (registered spelling, item)

    @staticmethod
    def _key(name: str) -> str:
        return name_key(name)

    def add(self, name: str, item: T) -> None:
        self._items[self._key(name)] = (name, item)

    def remove(self, name: str) -> None:
        """Unregister ``name`` (a test's toy entry); raises :class:`UnknownNameError` if absent."""
        del self._items[self._key(self.canonical(name))]

    def names(self) -> list[str]:
        """The registered spellings (``pytorch-grad-cam``, as documented)."""
        return [name for name, _ in self._items.values()]

    def canonical(self, name: str) -> str:
        """The registered spelling of ``name``; raises :class:`UnknownNameError` if absent."""
        key = self._key(name)
        if key not in self._items:
            hint = _did_you_mean(key, {k: shown for k, (shown, _) in self._items.items()})
            raise UnknownNameError(f"unknown {self.kind} {name!r}{hint}; valid: {', '.join(self.names())}")
        return self._items[key][0]

    def get(self, name: str) -> T:
        return self._items[self._key(self.canonical(name))][1]


def parse_names(spec: str | Sequence[str], valid: Sequence[str], kind: str, *, empty_ok: bool = False) -> list[str]:
    """The one parser of name lists (methods, metrics): ``spec`` is a comma-separated string or a
    list of names (whose items may hold commas too); returns them in ``valid``'s spelling.

    Names compare as :class:`Registry` keys do (whitespace stripped, case-insensitive, ``-`` and
    ``_`` equivalent); ``all`` stands for every valid name, in ``valid``'s order; duplicates are
    dropped (first occurrence kept). Every unknown name is reported at once, each with the
    registry's "did you mean" hint.

    Raises:
        UnknownNameError: some names are not in ``valid``
            (``unknown metric(s) auc, insdl (did you mean 'insdel'?); valid: ad, ai, insdel, epg``).
        ValueError: no name given (unless ``empty_ok``, which returns ``[]``).
    """
    parts = [spec] if isinstance(spec, str) else list(spec)
    given = [n.strip() for part in parts for n in part.split(",") if n.strip()]
    if not given:
        if empty_ok:
            return []
        raise ValueError(f"no {kind} given")
    by_key = {name_key(v): v for v in valid}
    names: list[str] = []
    unknown: list[str] = []
    for name in given:
        key = name_key(name)
        if key in by_key:
            names.append(by_key[key])
        elif key == "all":
            names.extend(valid)
        else:
            unknown.append(f"{name}{_did_you_mean(key, by_key)}")
    if unknown:
        raise UnknownNameError(f"unknown {kind}(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return list(dict.fromkeys(names))
