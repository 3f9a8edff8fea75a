"""The long operations of the web UI, each a ``sage-finetune`` command in a worker process.

A run, an evaluation, a merge or an export would block the server for minutes and hold the
training stack in its memory: ``Jobs.start`` runs the same command the user would type
(``python -m sage_finetune_plugin.cli run TASK_DIR ...``) in its own process group, its output
in ``TASK/logs/ui-<kind>.log``. One job per task at a time (the run lock refuses a second run
anyway); ``Jobs.stop_all`` ends them when the server stops: a run is interrupted as Ctrl-C does
(a checkpoint at the end of its step, status interrupted, resumable), the others are stopped.
Nothing here imports FastAPI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LockError
from ..paths import LOGS_DIR
from ..serve import stop_process_group

#: Exit code of a command stopped by Ctrl-C (an interrupted run, resumable).
INTERRUPTED = 130
#: Seconds a run gets to finish its step and save its checkpoint when the server stops.
RUN_STOP_GRACE = (300.0, 10.0)
OTHER_STOP_GRACE = (10.0, 5.0)
#: A progress bar's line in a log (``label:  40%|████  | 8/20 [...]``): left out of the tail.
_BAR = re.compile(r"\d+%\|")


@dataclass
class Job:
    """A worker process working on a task: what it does, how it ends."""

    kind: str
    task: str
    command: list[str]
    log: Path
    process: subprocess.Popen[str]
    started: float = field(default_factory=time.time)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def state(self) -> str:
        """``running``, ``done``, ``interrupted`` or ``failed``."""
        code = self.process.poll()
        if code is None:
            return "running"
        return {0: "done", INTERRUPTED: "interrupted"}.get(code, "failed")

    def error(self) -> str | None:
        """The command's one-line error (its last ``Error: ...`` line), if it failed."""
        if self.state in ("running", "done"):
            return None
        lines = _tail(self.log)
        said = [line[len("Error: ") :] for line in lines if line.startswith("Error: ")]
        if said:
            return said[-1]
        return lines[-1] if lines else f"{self.kind} exited with code {self.process.returncode}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "task": self.task,
            "state": self.state,
            "pid": self.process.pid,
            "exit_code": self.process.poll(),
            "error": self.error(),
            "started": self.started,
            "log": [line for line in _tail(self.log) if not _BAR.search(line)][-20:],
        }


def _tail(path: Path, size: int = 16384) -> list[str]:
    """The last lines of a log (progress bars' carriage returns as line ends)."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(path.stat().st_size - size, 0))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]


class Jobs:
    """The worker processes this server started, the latest per task."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._stopping = False

    def get(self, task: str) -> Job | None:
        return self._jobs.get(task)

    def busy(self, task: str) -> Job | None:
        """The job working on ``task`` now, if any."""
        job = self._jobs.get(task)
        return job if job is not None and job.running else None

    def check_idle(self, task: str) -> None:
        """LockError when a job of this server works on ``task``."""
        job = self.busy(task)
        if job is not None:
            raise LockError(
                f"Task {task!r} is busy: its {job.kind} (process {job.process.pid}) is still "
                "running; wait for it to end or cancel it."
            )

    def start(self, kind: str, task_dir: Path, args: list[str]) -> Job:
        """Run ``sage-finetune KIND TASK_DIR ARGS`` for the task at ``task_dir``."""
        task = task_dir.name
        command = [sys.executable, "-m", "sage_finetune_plugin.cli", kind, str(task_dir), *args]
        with self._lock:
            if self._stopping:
                raise LockError("The server is stopping: start it again to run more.")
            self.check_idle(task)
            log = task_dir / LOGS_DIR / f"ui-{kind}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("wb") as output:
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    text=True,
                    start_new_session=True,  # the terminal's Ctrl-C reaches the server only
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            job = Job(kind, task, command, log, process)
            self._jobs[task] = job
        return job

    def stop_all(self) -> list[Job]:
        """Stop every running job, runs as Ctrl-C stops them (checkpointed, resumable); wait
        for each. Returns the jobs that were running."""
        with self._lock:
            self._stopping = True
            running = [job for job in self._jobs.values() if job.running]
        threads = [
            threading.Thread(
                target=stop_process_group,
                args=(job.process, RUN_STOP_GRACE if job.kind == "run" else OTHER_STOP_GRACE),
            )
            for job in running
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return running
