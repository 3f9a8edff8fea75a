"""Training methods as units: one module per method, found through one registry.

A method (``methods.base.Method``) declares in one place what it trains on and how: the record
formats it reads and how a record becomes a sample, its statistics, how it adjusts a config
and what stops a run, its dry-run lines, its memory profile, the metrics it records and the
trainer it builds. The built-in methods are ``sft``, ``dpo``, ``orpo``, ``kto`` and ``grpo``; other
packages add methods through the entry-point group ``sage_finetune.methods`` (the entry point
names a ``Method`` subclass or instance). Plugins are loaded only when asked for, and one that
fails to load is listed as broken (``sage finetune methods``) without breaking the others.

This package imports nothing heavy, and nothing of the method modules until a method is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..registry import Entry, Registry

if TYPE_CHECKING:
    from .base import Method

#: The entry-point group third-party methods register in.
ENTRY_POINT_GROUP = "sage_finetune.methods"


def _check(name: str, unit: Any) -> Method:
    from .base import Method

    if not isinstance(unit, Method):
        raise TypeError(f"{type(unit).__name__} is not a sage_finetune_plugin.methods.base.Method")
    if unit.name != name:
        raise TypeError(f"it calls itself {unit.name!r}, not {name!r} as its entry point does")
    return unit


REGISTRY: Registry[Method] = Registry(
    "method",
    {
        "sft": "sage_finetune_plugin.methods.sft:SFT",
        "dpo": "sage_finetune_plugin.methods.dpo:DPO",
        "orpo": "sage_finetune_plugin.methods.orpo:ORPO",
        "kto": "sage_finetune_plugin.methods.kto:KTO",
        "grpo": "sage_finetune_plugin.methods.grpo:GRPO",
    },
    group=ENTRY_POINT_GROUP,
    check=_check,
)


def method_names() -> list[str]:
    """The usable methods' names (built-ins first); nothing is imported."""
    return REGISTRY.names()


def get_method(name: str) -> Method:
    """The method called ``name``: ConfigError if there is none, PluginError if it is a
    plugin that cannot be loaded."""
    return REGISTRY.get(name)


def method_entries() -> list[Entry]:
    """Every method with its origin; broken plugins with their error."""
    return REGISTRY.entries()


def readers_of(data_format: str) -> list[str]:
    """The methods that train on records of ``data_format`` (loaded plugins included)."""
    from ..errors import PluginError

    found = []
    for name in method_names():
        try:
            if data_format in get_method(name).formats:
                found.append(name)
        except PluginError:
            continue
    return found
