"""The run lock: one training process per task directory.

``<task>/.lock`` holds the owner's pid, host name and start time as JSON. A second run on the
same task is refused while the owner is alive; a lock left by a dead process on this host (a
``kill -9``, a power cut) is stale and taken over. A lock held on another host cannot be
checked from here and is refused with the command to remove it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import LockError
from .meta import now_iso
from .paths import LOCK_FILE


class RunLock:
    """Context manager holding ``<task_dir>/.lock`` for the lifetime of a run."""

    def __init__(self, task_dir: Path) -> None:
        self.path = Path(task_dir) / LOCK_FILE
        self.took_over: dict[str, Any] | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise LockError naming the live owner."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": now_iso()}
        while not self._create(record):
            owner = read_lock(self.path)
            if owner is None:  # released between our attempt and the read: try again
                continue
            if not is_stale(owner):
                raise LockError(_held_message(self.path, owner))
            # A dead owner: remove its lock and race for a fresh one (O_EXCL picks one winner).
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.took_over = owner
        return self

    def check(self) -> None:
        """Raise LockError if a live process holds the lock (without taking it)."""
        owner = read_lock(self.path)
        if owner is not None and not is_stale(owner):
            raise LockError(_held_message(self.path, owner))

    def release(self) -> None:
        """Remove the lock if this process still owns it."""
        owner = read_lock(self.path)
        if owner is not None and owner.get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def _create(self, record: dict[str, Any]) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
        return True

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def read_lock(path: Path) -> dict[str, Any] | None:
    """The lock's record; None if there is no lock; ``{}`` if it is unreadable (stale)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def is_stale(owner: dict[str, Any]) -> bool:
    """True if the owner is provably gone: a dead pid on this host, or a garbled file."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    if owner.get("host") != socket.gethostname():
        return False
    return not pid_alive(pid)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """A killed child that its parent has not reaped yet still answers ``kill(pid, 0)``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (macOS) or the process just went away
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def _held_message(path: Path, owner: dict[str, Any]) -> str:
    where = owner.get("host", "?")
    since = owner.get("started_at", "?")
    if where != socket.gethostname():
        hint = f"if no run is active on {where}, delete {path}"
    else:
        hint = "wait for it to finish or stop it (Ctrl-C saves a checkpoint), then `run --resume`"
    return (
        f"Task {path.parent} is being trained by process {owner.get('pid')} on {where} "
        f"(since {since}): {hint}."
    )
