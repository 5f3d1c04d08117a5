"""A tiny name → class registry shared by protection methods and defenses (timm's pattern).

Unknown names fail with the list of valid ones and close matches; there are no ``if name == ...``
chains anywhere else.
"""

from __future__ import annotations

import difflib
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, type[T]] = {}

    def register(self, *names: str):
        """Class decorator: ``@METHODS.register("emn")``; extra names are aliases. The first name becomes
        the class's ``name``, so a component's name is written in one place."""

        def deco(cls: type[T]) -> type[T]:
            for name in names:
                if name in self._entries:
                    raise ValueError(f"{self.kind} {name!r} is registered twice")
                self._entries[name] = cls
            cls.name = names[0]
            return cls

        return deco

    def get(self, name: str) -> type[T]:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(
                f"unknown {self.kind} {name!r}{hint}; valid {self.kind}s: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> list[tuple[str, type[T]]]:
        return sorted(self._entries.items())

    def __contains__(self, name: str) -> bool:
        return name in self._entries
