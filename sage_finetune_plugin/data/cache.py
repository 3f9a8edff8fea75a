"""The prepared-data cache: rendered splits and their statistics, one folder per key.

An entry is ``<cache_dir>/<key>`` with ``train`` (and ``eval``) saved by
``datasets.save_to_disk`` and ``stats.json``, written atomically (another process storing the
same key first wins). The key is a hash of everything the rendered data depends on (see
``preparation``); the newest ``ENTRIES_KEPT`` entries are kept. Imports datasets inside the
functions that use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..paths import atomic_directory

if TYPE_CHECKING:
    from datasets import Dataset

#: Prepared datasets kept per cache directory (the most recently used ones).
ENTRIES_KEPT = 3


def cache_key(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def store(
    entry: Path, train: Dataset, evaluation: Dataset | None, stats: Mapping[str, Any]
) -> tuple[Dataset, Dataset | None]:
    """Save prepared splits and their statistics in the cache entry, prune old entries, and
    reload the splits from the saved copy (so the data is memory-mapped from the cache)."""
    with atomic_directory(entry) as building:
        train.save_to_disk(str(building / "train"))
        if evaluation is not None:
            evaluation.save_to_disk(str(building / "eval"))
        (building / "stats.json").write_text(json.dumps(dict(stats), indent=2) + "\n")
    _prune(entry.parent, keep=entry)
    return _splits(entry)


def load(entry: Path) -> tuple[Dataset, Dataset | None, dict[str, Any]] | None:
    """The cached splits and statistics in ``entry``; None if there are none (a broken entry
    is removed)."""
    if not (entry / "stats.json").is_file():
        return None
    try:
        stats = json.loads((entry / "stats.json").read_text())
        train, evaluation = _splits(entry)
    except (OSError, ValueError, TypeError):
        shutil.rmtree(entry, ignore_errors=True)
        return None
    os.utime(entry)  # most recently used: kept by pruning
    return train, evaluation, stats


def _splits(entry: Path) -> tuple[Dataset, Dataset | None]:
    from datasets import load_from_disk

    train = load_from_disk(str(entry / "train"))
    evaluation = load_from_disk(str(entry / "eval")) if (entry / "eval").is_dir() else None
    return train, evaluation


def _prune(cache_dir: Path, keep: Path) -> None:
    entries = [p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[ENTRIES_KEPT:]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)
