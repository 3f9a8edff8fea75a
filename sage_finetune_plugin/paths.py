"""Where tasks and caches live, what a task directory holds, and how files get there.

The task root is ``--root`` if given, else ``$SAGE_FINETUNE_HOME``, else ``./finetune_output``.
A task is a directory holding ``finetune_meta.json``; commands take a task name (looked up
under the root) or a path to such a directory.

Everything the plugin writes is written atomically: a file through ``atomic_write_text``
(temp file + ``os.replace``), a folder through ``atomic_directory`` (built in a hidden sibling,
renamed into place when complete). A crash or Ctrl-C never leaves half a file or folder, and
an existing one is only replaced by a complete new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import TaskError

META_FILENAME = "finetune_meta.json"
# What a task directory holds, relative to it (one definition for every layer).
DATASET_FILE = "data/train.jsonl"
CONFIG_FILE = "training_config.json"
PREPARED_CACHE = ".cache/prepared"
#: The evaluation before the first step, cached per model, eval split and settings.
BASE_EVAL_CACHE = ".cache/base-eval.json"
ADAPTER_DIR = "adapter"
#: The initial adapter of a PiSSA or OLoRA run (the final one is converted with it).
ADAPTER_INIT_DIR = "adapter_init"
#: The model a full or freeze run saves (it has no adapter).
MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"
#: The logged steps of the task's run (one JSON object a line: step, time, what was logged),
#: for a live loss curve (`sage finetune ui`).
PROGRESS_LOG = "progress.jsonl"
#: What `sage finetune eval` writes: report.json, report.md, cached base-model numbers.
EVAL_DIR = "eval"
LOSS_PLOT = "loss.png"
MERGED_DIR = "merged"
#: Where `sage finetune export` writes GGUF files and Ollama Modelfiles.
EXPORT_DIR = "export"
LOCK_FILE = ".lock"
#: Written by `sage finetune cancel`: the run stops at the end of its current step.
CANCEL_FILE = ".cancel"
#: Where a multi-process run writes the config every rank trains with.
LAUNCH_CONFIG = ".launch/config.json"
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


# --- atomic writes -----------------------------------------------------------------------------


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; empty when the file is missing, unreadable or not an
    object (a cache that is rebuilt when damaged)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; use the usual file mode
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: Path, *, replace: bool = False) -> Iterator[Path]:
    """A temporary file beside ``path`` for the ``with`` block to fill (large or binary output),
    renamed to ``path`` when the block ends without an exception.

    An existing ``path`` is replaced only with ``replace=True`` (FileExistsError otherwise). On
    an exception, Ctrl-C included, the temporary file is removed and ``path`` stays as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        if not replace and path.exists():
            raise FileExistsError(f"{path} already exists")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(target: Path, *, replace: bool = False) -> Iterator[Path]:
    """Build a folder in a hidden sibling of ``target`` and rename it into place on success.

    The ``with`` block fills the yielded folder. When it ends without an exception the folder
    becomes ``target``: a missing or empty ``target`` is simply replaced; an existing one only
    with ``replace=True`` (it is moved aside, the new one renamed in, the old one removed, so
    ``target`` is always either complete old or complete new). On an exception, Ctrl-C
    included, the partial folder is removed and ``target`` is left as it was. If another
    process installed ``target`` meanwhile and ``replace`` is false, that one is kept.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _hidden_sibling(target, "tmp")
    try:
        yield staging
        _install(staging, target, replace)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_tree(target: Path) -> None:
    """Remove a folder so that it disappears at once: renamed aside first, then deleted."""
    target = Path(target)
    if not target.exists():
        return
    aside = _hidden_sibling(target, "old")
    os.replace(target, aside / target.name)
    shutil.rmtree(aside, ignore_errors=True)


def _install(staging: Path, target: Path, replace: bool) -> None:
    with contextlib.suppress(OSError):  # an empty leftover folder is not worth keeping
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
    try:
        os.rename(staging, target)  # fails if target exists (a non-empty folder)
        return
    except OSError:
        if not target.exists():
            raise
        if not replace:
            return  # another process installed the same thing first: keep it
    aside = _hidden_sibling(target, "old")
    os.replace(target, aside / target.name)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(aside / target.name, target)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _hidden_sibling(target: Path, kind: str) -> Path:
    """A new hidden folder next to ``target`` (same file system, so renames are atomic)."""
    folder = target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    folder.mkdir()
    return folder
