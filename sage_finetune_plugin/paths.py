"""Where tasks and caches live. The one resolver every command uses.

The task root is ``--root`` if given, else ``$SAGE_FINETUNE_HOME``, else ``./finetune_output``.
A task is a directory holding ``finetune_meta.json``; commands take a task name (looked up
under the root) or a path to such a directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import TaskError

META_FILENAME = "finetune_meta.json"
# What a task directory holds, relative to it (one definition for every layer).
DATASET_FILE = "data/train.jsonl"
CONFIG_FILE = "training_config.json"
PREPARED_CACHE = ".cache/prepared"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"
LOSS_PLOT = "loss.png"
MERGED_DIR = "merged"
HOME_ENV = "SAGE_FINETUNE_HOME"
CACHE_ENV = "SAGE_FINETUNE_CACHE"
DEFAULT_ROOT = "finetune_output"
MAX_NAME_LENGTH = 64


def task_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The directory that holds tasks (not created here)."""
    if root is not None and os.fspath(root) != "":
        return Path(root).expanduser()
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    return Path(DEFAULT_ROOT)


def cache_dir() -> Path:
    """Per-user cache (converted models): ``$SAGE_FINETUNE_CACHE`` or the XDG cache dir."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sage-finetune"


def validate_task_name(name: str) -> str:
    """Return ``name`` if it is a safe task name, else raise TaskError saying why."""
    problem = None
    if not name:
        problem = "it is empty"
    elif len(name) > MAX_NAME_LENGTH:
        problem = f"it is longer than {MAX_NAME_LENGTH} characters"
    elif "/" in name or "\\" in name or (os.altsep and os.altsep in name):
        problem = "it contains a path separator"
    elif name in (".", "..") or ".." in name:
        problem = "it contains '..'"
    elif name.startswith("."):
        problem = "it starts with a dot"
    elif not name.isprintable() or any(ch.isspace() for ch in name):
        problem = "it contains spaces or unprintable characters"
    if problem:
        raise TaskError(
            f"Invalid task name {name!r}: {problem}. "
            "Use letters, digits, '-', '_' or '.', at most 64 characters."
        )
    return name


def looks_like_path(ref: str) -> bool:
    return (
        "/" in ref
        or "\\" in ref
        or ref.startswith(("~", "."))
        or (os.altsep is not None and os.altsep in ref)
    )


def new_task_dir(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """Where a new task called ``name`` goes (validated, not created)."""
    return task_root(root) / validate_task_name(name)


def resolve_task(ref: str, root: str | os.PathLike[str] | None = None) -> Path:
    """The directory of an existing task, given its name or its path."""
    if looks_like_path(ref):
        path = Path(ref).expanduser()
        if not path.is_dir():
            raise TaskError(f"Task directory {ref} does not exist.")
        if not (path / META_FILENAME).is_file():
            raise TaskError(
                f"{ref} is not a task directory (no {META_FILENAME}). "
                "Create one with `sage finetune quickstart`."
            )
        return path
    validate_task_name(ref)
    base = task_root(root)
    path = base / ref
    if (path / META_FILENAME).is_file():
        return path
    local = Path(ref)
    if (local / META_FILENAME).is_file():
        return local
    raise TaskError(
        f"Task {ref!r} not found under {base} (no {ref}/{META_FILENAME}). "
        "See `sage finetune list`, or create it with `sage finetune quickstart`."
    )
