"""Registries of units (training methods, adapters): built-in ones and third-party plugins.

A ``Registry`` knows its built-in units by import path (``"package.module:Class"``) and finds
plugins through an entry-point group; nothing is imported until a unit is asked for. A plugin
that fails to load is reported as broken (``entries()``) and refused with one line when it is
asked for; it never breaks the other units or the command line. A plugin cannot replace a
built-in unit of the same name (it is listed as shadowed). Imports nothing heavy.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import ConfigError, PluginError, first_line

T = TypeVar("T")

#: ``origin`` of a built-in unit.
BUILTIN = "built-in"


@dataclass(frozen=True)
class Entry:
    """One unit as the registry lists it: its name, where it comes from (``built-in`` or the
    distribution that registers it) and, for a plugin that cannot be used, why."""

    name: str
    origin: str
    target: str
    error: str | None = None

    @property
    def broken(self) -> bool:
        return self.error is not None


class Registry(Generic[T]):
    """Units of one ``kind`` ("method", "adapter"): ``builtins`` maps names to import paths,
    ``group`` is the entry-point group plugins register in (None: built-ins only). ``check``
    validates a loaded unit (raise TypeError to mark a plugin broken)."""

    def __init__(
        self,
        kind: str,
        builtins: dict[str, str],
        group: str | None = None,
        check: Callable[[str, Any], T] | None = None,
    ) -> None:
        self.kind = kind
        self.group = group
        self._builtins = dict(builtins)
        self._check = check
        self._loaded: dict[str, T] = {}
        self._broken: dict[str, str] = {}

    # --- what there is (nothing imported) -----------------------------------------------------

    def names(self) -> list[str]:
        """Every usable name: the built-ins first, then the plugins (not loaded yet)."""
        plugins = [name for name in self._plugins() if name not in self._builtins]
        return [*self._builtins, *(n for n in plugins if n not in self._broken)]

    def entries(self) -> list[Entry]:
        """Every unit with its origin, each plugin loaded to tell whether it works."""
        found = [Entry(name, BUILTIN, target) for name, target in self._builtins.items()]
        for name, (origin, target) in self._plugins().items():
            error: str | None
            if name in self._builtins:
                error = f"shadowed: {name!r} is a built-in {self.kind}"
            else:
                error = self._try(name)
            found.append(Entry(name, origin, target, error))
        return found

    def _try(self, name: str) -> str | None:
        try:
            self.get(name)
        except PluginError:
            return self._broken[name]
        return None

    @functools.cache  # noqa: B019 - one registry per kind, alive for the process
    def _plugins(self) -> dict[str, tuple[str, str]]:
        """name -> (distribution, ``module:attr``) of the entry points in the group."""
        if self.group is None:
            return {}
        plugins: dict[str, tuple[str, str]] = {}
        for point in importlib.metadata.entry_points(group=self.group):
            dist = getattr(point, "dist", None)
            origin = getattr(dist, "name", None) or "a plugin"
            plugins.setdefault(point.name, (origin, point.value))
        return plugins

    def refresh(self) -> None:
        """Forget what was found and loaded (after installing a plugin in this process)."""
        type(self)._plugins.cache_clear()
        self._loaded.clear()
        self._broken.clear()

    # --- loading one --------------------------------------------------------------------------

    def get(self, name: str) -> T:
        """The unit called ``name``; ConfigError for an unknown name, PluginError for a plugin
        that does not load."""
        if name in self._loaded:
            return self._loaded[name]
        if name in self._broken:
            raise PluginError(self._broken[name])
        if name in self._builtins:
            unit = self._load(name, self._builtins[name])
        elif name in self._plugins():
            origin, target = self._plugins()[name]
            try:
                unit = self._load(name, target)
            except Exception as exc:  # a plugin's bug must not break the tool
                self._broken[name] = (
                    f"The {self.kind} {name!r} (from {origin}, {target}) cannot be used: "
                    f"{type(exc).__name__}: {first_line(exc)}. Fix or uninstall {origin}."
                )
                raise PluginError(self._broken[name]) from None
        else:
            known = ", ".join(self.names())
            raise ConfigError(f"Unknown {self.kind} {name!r}: choose one of {known}.")
        self._loaded[name] = unit
        return unit

    def _load(self, name: str, target: str) -> T:
        module_name, _, attribute = target.partition(":")
        value: Any = importlib.import_module(module_name)
        for part in filter(None, attribute.split(".")):
            value = getattr(value, part)
        if isinstance(value, type):
            value = value()
        return self._check(name, value) if self._check else value
