"""Names to things, filled where each thing is defined: the one registration style of dcccl.

A registry is filled by a decorator on the class or function it names (in the style of timm's model registry), and
each package whose modules register something imports all of its modules, so that a new file is found without
touching another one. Backbones, stages, aggregation rules and compared methods are registered this way.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from typing import Generic, Optional, TypeVar

from dcccl.errors import ConfigError

Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
    """Entries of one kind by name.

    Args:
        kind: What the entries are, for messages (``stage``, ``backbone``...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, entry: Entry) -> None:
        """Register ``entry`` as ``name``.

        Raises:
            ValueError: Another entry has that name already (two definitions of one name are a bug).
        """
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"two {self.kind}s are registered as {name!r}: one from {_origin(self._entries[name])}, "
                             f"one from {_origin(entry)}")
        self._entries[name] = entry

    def __getitem__(self, name: str) -> Entry:
        """The entry called ``name``.

        Raises:
            ConfigError: No entry has that name; the message lists the known names.
        """
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}: choose among {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def remove(self, name: str) -> None:
        """Forget ``name`` (a test's own entries, once it is done)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> Optional[Entry]:
        """The entry called ``name``, or ``None``."""
        return self._entries.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._entries)

    def values(self) -> list[Entry]:
        """Every entry, in the order they were registered."""
        return list(self._entries.values())

    def items(self) -> list[tuple[str, Entry]]:
        """Every name with its entry, in the order they were registered."""
        return list(self._entries.items())


def _origin(entry: object) -> str:
    """The module that defines ``entry`` (or, for a record of a class, that class's)."""
    defined = getattr(entry, "__module__", None)
    inner = getattr(entry, "module", None)
    return str(getattr(inner, "__module__", None) or defined or "?")


def import_submodules(package: str, path: list[str]) -> None:
    """Import every module of ``package`` (its ``__path__``), so that what each one registers is known."""
    for module in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{module.name}")
