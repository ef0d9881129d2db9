"""Plain-dict registries filled by a decorator: one per pluggable family."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from edgeslim.core.errors import ConfigError, near

T = TypeVar("T")


class Registry(Generic[T]):
    """A named dict of pluggable parts.

    Duplicate registration raises; looking up an unknown name raises a :class:`ConfigError` that lists
    the valid names.
    """

    def __init__(self, family: str) -> None:
        self.family = family
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.family} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        key = str(getattr(name, "value", name))
        try:
            return self._items[key]
        except KeyError:
            raise ConfigError(
                f"unknown {self.family} {key!r}{near(key, self._items)}; valid: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return str(getattr(name, "value", name)) in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)
