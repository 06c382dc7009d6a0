"""One small registry type, used for datasets, models, attacks (and later defenses).

A registry maps a user-facing name (what people type on the command line or in a config)
to a factory. Entries are added with the :meth:`Registry.register` decorator inside the
package that owns them; each package's ``__init__`` imports its own modules, so nothing
is registered as a side effect of importing something far away.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from bastion.errors import ConfigError, UnknownNameError

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Entry(Generic[F]):
    """A registered factory with its name, one-line summary and default settings."""

    name: str
    factory: F
    summary: str
    defaults: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[F]):
    """Name -> factory table with helpful errors for unknown names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[F]] = {}

    def register(self, name: str, *, summary: str = "", **defaults: Any) -> Callable[[F], F]:
        """Decorator: register ``factory`` under ``name`` (lower-case, may contain '-')."""
        if name != name.lower() or not name or " " in name:
            raise ConfigError(f"{self.kind} name {name!r} must be non-empty lower-case without spaces")

        def deco(factory: F) -> F:
            if name in self._entries:
                raise ConfigError(f"{self.kind} {name!r} is registered twice")
            first_doc_line = ((factory.__doc__ or "").strip().splitlines() or [""])[0]
            self._entries[name] = Entry(name, factory, summary or first_doc_line, dict(defaults))
            return factory

        return deco

    def get(self, name: str) -> Entry[F]:
        """Return the entry for ``name`` or raise :class:`UnknownNameError` naming the choices."""
        key = name.lower() if isinstance(name, str) else name
        if key not in self._entries:
            close = difflib.get_close_matches(str(name), self._entries, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{hint}; known: {', '.join(sorted(self._entries))}"
            )
        return self._entries[key]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._entries

    def __iter__(self) -> Iterator[Entry[F]]:
        return iter(self._entries[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._entries)
