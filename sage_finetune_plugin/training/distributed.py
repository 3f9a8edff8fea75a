"""The worker's view of a multi-process run: which rank am I, and where does my output go.

torchrun and ``accelerate launch`` describe the run in the environment (RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, ACCELERATE_USE_FSDP); the launcher (launch.py) adds ``SAGE_FINETUNE_LAUNCHED``
because it holds the run lock for every rank. Each worker tees its output (file descriptors 1
and 2, so C++ and library logs too) to ``<task>/logs/rank-<r>.log``; only rank 0 also shows it
on the console. A worker that fails records its error in ``<task>/logs/rank-<r>.error.json``
for the launcher. Reads the environment only; imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import FinetuneError
from ..paths import LOGS_DIR

logger = logging.getLogger(__name__)

#: Set by the launcher in the workers' environment: the run lock is held by the launcher.
LAUNCHED_ENV = "SAGE_FINETUNE_LAUNCHED"


def rank() -> int:
    """This process's global rank (0 outside a distributed launch)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of training processes in the run (1 outside a distributed launch)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this process writes the task's files (meta, adapter, plots)."""
    return rank() == 0


def fsdp_enabled() -> bool:
    """Whether ``accelerate launch`` started this process with an FSDP config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def deepspeed_enabled() -> bool:
    """Whether ``accelerate launch`` started this process with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")


def launched() -> bool:
    """Whether this process was started by ``launch`` (which holds the run lock)."""
    return os.environ.get(LAUNCHED_ENV) == "1"


def rank_log(task_dir: Path, global_rank: int) -> Path:
    return Path(task_dir) / LOGS_DIR / f"rank-{global_rank}.log"


def error_record(task_dir: Path, global_rank: int) -> Path:
    return Path(task_dir) / LOGS_DIR / f"rank-{global_rank}.error.json"


class _Tee:
    """Route a file descriptor through a pipe into ``log`` (and into ``echo``, a descriptor,
    when given), so output written by C code and by handlers made at import is kept."""

    def __init__(
        self, fd: int, log: BinaryIO, lock: threading.Lock, echo: int | None = None
    ) -> None:
        self.fd, self.log, self.lock, self.echo = fd, log, lock, echo
        self.original = os.dup(fd)
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        self.reader = os.fdopen(read_end, "rb", buffering=0)
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        while chunk := self.reader.read(65536):
            with self.lock:
                self.log.write(chunk)
                self.log.flush()
            if self.echo is not None:
                os.write(self.echo, chunk)

    def close(self) -> None:
        os.dup2(self.original, self.fd)  # closes the pipe's last write end: the pump ends
        self.thread.join(timeout=10)
        os.close(self.original)
        self.reader.close()


@contextlib.contextmanager
def worker_output(task_dir: str | os.PathLike[str]) -> Iterator[None]:
    """In a distributed worker: tee this process's output to ``logs/rank-<r>.log`` (rank 0
    also shows it on stdout; the launcher keeps stderr for its own messages) and record a
    failure for the launcher. A no-op in a single process."""
    if world_size() <= 1 and not launched():
        yield
        return
    task_dir, me = Path(task_dir), rank()
    path = rank_log(task_dir, me)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    with path.open("ab") as log:
        sys.stdout.flush()
        sys.stderr.flush()
        console = os.dup(1) if me == 0 else None
        tees = [_Tee(fd, log, lock, console) for fd in (1, 2)]
        try:
            logger.info("rank %d of %d on %s", me, world_size(), socket.gethostname())
            yield
        except BaseException as exc:
            message = error_line(exc)
            details = "" if isinstance(exc, FinetuneError) else traceback.format_exc()
            sys.stderr.flush()
            with lock:  # into the log only: the launcher reports the error once
                log.write(f"{details}Error: {message}\n".encode())
            record = {"rank": me, "time": time.time(), "message": message}
            error_record(task_dir, me).write_text(json.dumps(record) + "\n", encoding="utf-8")
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for tee in tees:
                tee.close()
            if console is not None:
                os.close(console)


def error_line(exc: BaseException) -> str:
    """One line for an exception: the message of a FinetuneError, else ``Type: message``."""
    if isinstance(exc, FinetuneError):
        text = str(exc)
    elif isinstance(exc, KeyboardInterrupt):
        text = "interrupted"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())
