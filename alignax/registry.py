"""Registries: things looked up by the names configs use (objectives, rewards, attention kernels,
architectures, dataset kinds, launch backends).

One behaviour everywhere: registering a name twice is a programming error (ValueError at import,
never a silent overwrite), and looking up an unknown name is a user error (ConfigError naming the
config field, the bad value and the known names).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from alignax.errors import AlignaxError, ConfigError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """A name → value mapping filled by `register`; read-only otherwise.

    what: what the entries are, in words ("objective", "attention kernel").
    field: the config field or flag users set the name with, for error messages.
    error: the error raised for an unknown name (ConfigError by default).
    """

    def __init__(self, what: str, *, field: str = "", error: type[AlignaxError] = ConfigError):
        self.what = what
        self.field = field
        self.error = error
        self._entries: dict[str, T] = {}

    def register(self, name: str, value: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._entries[name] = value
        return value

    def decorator(self, *names: str) -> Callable[[T], T]:
        """`@REGISTRY.decorator("a", "b")` registers the decorated value under each name."""
        def add(value: T) -> T:
            for name in names:
                self.register(name, value)
            return value
        return add

    def lookup(self, name: str, field: str | None = None) -> T:
        """The entry for `name`; `self.error` naming the field and the known names otherwise."""
        if name not in self._entries:
            where = field or self.field
            prefix = f"{where}={name!r}: " if where else ""
            raise self.error(f"{prefix}unknown {self.what} {name!r}; choose one of {sorted(self._entries)}")
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {sorted(self._entries)})"
