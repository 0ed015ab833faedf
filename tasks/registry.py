"""A small explicit registry: a dict that refuses duplicates and suggests close names on a miss."""

from __future__ import annotations

import difflib
from typing import Generic, TypeVar

from dafactory.tasks.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str):
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return add

    def names(self) -> list[str]:
        return sorted(self._items)

    def check(self, name: str) -> str:
        if name not in self._items:
            close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.4)
            hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
            raise UserError(
                f"unknown {self.kind} {name!r}: {hint}known: {', '.join(self.names())}"
            )
        return name

    def get(self, name: str) -> T:
        return self._items[self.check(name)]

    def __contains__(self, name: str) -> bool:
        return name in self._items
