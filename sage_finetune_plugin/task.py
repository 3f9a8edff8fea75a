"""A task: one directory with its ``finetune_meta.json``, loaded once, and what it holds.

``Task.open("code")`` finds a task by name under the root (or by path) and reads its meta once;
commands and services take a Task instead of re-reading the file. Through it: the recorded
training config, the adapter and checkpoints, the merged model, the run lock, and the
lifecycle that SAGE's task manager users expect: ``request_cancel`` (stop a run from another
terminal, as Ctrl-C does) and ``delete``. Imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapters import adapter_for
from .checkpoints import ADAPTER_FILES, complete_checkpoints, find_adapter, latest_checkpoint
from .config import TrainingConfig
from .errors import LockError, MetaError, TaskError
from .locks import RunLock, is_stale, read_lock
from .meta import TaskMeta, TaskStatus, load_meta, update_meta
from .models import is_model_dir
from .paths import (
    CANCEL_FILE,
    CHECKPOINTS_DIR,
    LOCK_FILE,
    LOGS_DIR,
    LOSS_PLOT,
    META_FILENAME,
    PREPARED_CACHE,
    atomic_write_text,
    remove_tree,
    resolve_task,
)

if TYPE_CHECKING:
    from .adapters.base import Adapter


class Task:
    """A task directory and its meta (read once; ``update`` writes changes through)."""

    def __init__(self, path: str | os.PathLike[str], meta: TaskMeta | None = None) -> None:
        self.path = Path(path)
        self.meta = meta if meta is not None else load_meta(self.path)

    @staticmethod
    def locate(ref: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Path:
        """The directory of the task called ``ref`` under ``root`` (or at the path ``ref``),
        without reading its meta: the one way every command finds a task."""
        return resolve_task(os.fspath(ref), root)

    @classmethod
    def open(cls, ref: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Task:
        """The task called ``ref`` under ``root`` (or at the path ``ref``)."""
        return cls(cls.locate(ref, root))

    @classmethod
    def of(cls, task: Task | str | os.PathLike[str], root: Any = None) -> Task:
        """``task`` itself if it is a Task, else the task it names."""
        return task if isinstance(task, Task) else cls.open(task, root)

    def __repr__(self) -> str:
        return f"Task({str(self.path)!r}, status={self.meta.status!r})"

    @property
    def name(self) -> str:
        return self.path.resolve().name

    # --- the meta ------------------------------------------------------------------------------

    def reload(self) -> TaskMeta:
        self.meta = load_meta(self.path)
        return self.meta

    def update(self, **changes: Any) -> TaskMeta:
        """Change fields of the meta and write it atomically (merged into the file as it is
        now, so fields written by another command are kept)."""
        self.meta = update_meta(self.path, **changes)
        return self.meta

    @property
    def base_model(self) -> str:
        """The base model the task trains (or trained) on: its training config's, else the
        meta's ``model``."""
        name = self.meta.training.get("model_name") or self.meta.model
        if not name:
            raise TaskError(
                f"The meta of {self.path} names no base model (keys training.model_name, model)."
            )
        return name

    @property
    def trust_remote_code(self) -> bool:
        return bool(self.meta.training.get("trust_remote_code", False))

    @property
    def system_prompt(self) -> str | None:
        """The default system prompt the task was trained with (``quickstart --system``)."""
        value = self.meta.training.get("system_prompt")
        return value if isinstance(value, str) and value else None

    def recorded_config(self, *, resume: bool = False) -> TrainingConfig:
        """The hyperparameters recorded for the task, its data paths resolved.

        Recorded means, in order: the config of the interrupted run when resuming (meta
        ``training``), the task's config file (meta ``config``), meta ``training``, or for metas
        of the original tool the defaults with the meta's ``model`` and ``dataset``.
        """
        meta = self.meta
        config_file = meta.path(self.path, meta.config)
        if resume and meta.training and meta.status != TaskStatus.PREPARED:
            config = TrainingConfig.from_dict(meta.training)
        elif config_file is not None and config_file.is_file():
            config = TrainingConfig.load(config_file)
        elif meta.training:
            config = TrainingConfig.from_dict(meta.training)
        else:
            defaults = TrainingConfig()
            config = defaults.replace(
                model_name=meta.model or defaults.model_name, data_path=meta.dataset
            )
        return self.with_task_paths(config)

    def with_task_paths(self, config: TrainingConfig) -> TrainingConfig:
        """``config`` writing into this task, its data paths looked up in the task first."""
        return config.replace(
            output_dir=str(self.path),
            data_path=self.data_path(config.data_path or self.meta.dataset),
            eval_data_path=self.data_path(config.eval_data_path),
        )

    def data_path(self, value: str | None) -> str | None:
        """A data path from the meta or a config: relative ones are looked up in the task
        directory first, then taken as given."""
        if not value:
            return None
        path = Path(value).expanduser()
        if not path.is_absolute() and (self.path / path).exists():
            return str(self.path / path)
        return str(path)

    # --- what the task holds -------------------------------------------------------------------

    @property
    def unit(self) -> Adapter:
        """The task's adapter unit (``finetuning_type``: lora, full or freeze)."""
        return adapter_for(self.meta.training)

    @property
    def kind(self) -> str:
        """What training changes: ``lora``, ``full`` or ``freeze``."""
        return self.unit.name

    @property
    def adapter_dir(self) -> Path:
        """The trained adapter (full and freeze tasks: the trained model folder)."""
        return self.meta.path(self.path, self.meta.adapter_path) or self.path / self.unit.folder

    def adapter_dir_for(self, config: TrainingConfig) -> Path:
        """Where a run of ``config`` finds what the task trained before (a later stage)."""
        recorded = self.adapter_dir
        folder = adapter_for(config).folder
        return recorded if recorded.name == folder else self.path / folder

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def merged_dir(self) -> Path | None:
        """The merged model the meta records, if any (it may have been removed since)."""
        return self.meta.path(self.path, self.meta.merged_path)

    def merged_state(self) -> str:
        """``current`` (a complete merged model, not older than the final adapter), ``stale``
        (the adapter was trained again since the merge), ``missing`` (recorded, but gone or
        incomplete) or ``none`` (never merged)."""
        merged = self.merged_dir
        if merged is None:
            return "none"
        if not is_model_dir(merged):
            return "missing"
        weights = next(
            (self.adapter_dir / n for n in ADAPTER_FILES if (self.adapter_dir / n).is_file()), None
        )
        fresh = (
            weights is None or weights.stat().st_mtime <= (merged / "config.json").stat().st_mtime
        )
        return "current" if fresh else "stale"

    @property
    def logs_dir(self) -> Path:
        return self.path / LOGS_DIR

    @property
    def loss_plot(self) -> Path:
        return self.path / LOSS_PLOT

    @property
    def prepared_cache(self) -> Path:
        return self.path / PREPARED_CACHE

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as (step, path), oldest first."""
        return complete_checkpoints(self.checkpoints_dir)

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.checkpoints_dir)

    def find_adapter(self, choice: str | int = "final") -> tuple[Path, str]:
        """The adapter to use (``final``, ``latest`` or a step number) and its label."""
        return find_adapter(self.path, self.adapter_dir, self.checkpoints_dir, choice)

    # --- runs: lock, cancel, delete ------------------------------------------------------------

    def lock(self) -> RunLock:
        """The run lock (a context manager; ``check()`` refuses when a live process holds it)."""
        return RunLock(self.path)

    def run_owner(self) -> dict[str, Any] | None:
        """The lock record of the process training this task now, or None. A lock held on
        another host counts as live (it cannot be checked from here)."""
        owner = read_lock(self.path / LOCK_FILE)
        return owner if owner is not None and not is_stale(owner) else None

    @property
    def cancel_file(self) -> Path:
        return self.path / CANCEL_FILE

    def request_cancel(self) -> dict[str, Any]:
        """Ask the run of this task to stop at the end of its current step, checkpoint saved
        (as Ctrl-C does): a request file every rank's trainer checks, and SIGINT to the owner
        when it runs on this host. Returns the owner's lock record; TaskError if none runs."""
        owner = self.run_owner()
        if owner is None:
            raise TaskError(
                f"Task {self.name!r} is not training (status {self.meta.status}): "
                "nothing to cancel."
            )
        atomic_write_text(self.cancel_file, f"{os.getpid()}\n")
        if owner.get("host") == socket.gethostname():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(owner["pid"]), signal.SIGINT)
        return owner

    def cancel_requested(self) -> bool:
        return self.cancel_file.exists()

    def clear_cancel(self) -> None:
        self.cancel_file.unlink(missing_ok=True)

    def delete(self, *, force: bool = False) -> None:
        """Remove the task directory. Refused while a run holds the task; a task marked as
        training that no live process holds (a crashed run) or locked on another host is
        removed only with ``force``."""
        delete_task_dir(self.path, force=force, meta=self.meta)


def delete_task(
    ref: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None, force: bool = False
) -> Path:
    """Remove the task called ``ref`` (see ``Task.delete``), also one whose meta cannot be
    read; returns the directory it was."""
    path = Task.locate(ref, root)
    delete_task_dir(path, force=force)
    return path


def delete_task_dir(path: Path, *, force: bool = False, meta: TaskMeta | None = None) -> None:
    """Remove the task at ``path`` (see ``Task.delete``); works on a task whose meta cannot
    be read too. The folder is renamed aside first, so it disappears at once."""
    path = Path(path)
    if not (path / META_FILENAME).is_file():
        raise TaskError(f"{path} is not a task directory (no {META_FILENAME}); not deleting it.")
    owner = read_lock(path / LOCK_FILE)
    live = owner is not None and not is_stale(owner)
    if live:
        assert owner is not None
        here = owner.get("host") == socket.gethostname()
        if here or not force:
            hint = (
                f"stop it first with `sage finetune cancel {path}`"
                if here
                else "if no run is active there, pass force=True"
            )
            raise LockError(
                f"Task {path.name!r} is being trained by process {owner.get('pid')} on "
                f"{owner.get('host', '?')}: {hint}."
            )
    if meta is None:
        with contextlib.suppress(MetaError):
            meta = load_meta(path)
    if meta is not None and meta.status == TaskStatus.TRAINING and not live and not force:
        raise TaskError(
            f"Task {path.name!r} is marked as training but no process holds it (a crashed "
            "run?): pass force=True to delete it, or continue it with `run --resume`."
        )
    remove_tree(path)


# --- listing -----------------------------------------------------------------------------------


@dataclass
class TaskEntry:
    """One task found under the root: its meta, or why it could not be read."""

    name: str
    path: Path
    meta: TaskMeta | None
    error: str | None = None

    @classmethod
    def read(cls, path: Path) -> TaskEntry:
        """The task at ``path`` with its meta, or broken with the reason it cannot be read."""
        try:
            return cls(path.name, path, load_meta(path))
        except MetaError as exc:
            return cls(path.name, path, None, str(exc))

    def summary(self) -> dict[str, Any]:
        """The row `sage finetune list` shows (and prints with --json). A run in progress
        shows its live progress: step of max steps, last loss, tokens/s, seconds left."""
        if self.meta is None:
            return {
                "name": self.name,
                "path": str(self.path),
                "status": "broken",
                "error": self.error,
            }
        m, task = self.meta, Task(self.path, self.meta)
        merged = task.merged_dir
        running = m.status == TaskStatus.TRAINING and task.run_owner() is not None
        progress = m.progress if running else {}
        return {
            "name": self.name,
            "path": str(self.path),
            "status": m.status,
            "running": running,
            "model": m.model,
            "format": m.format,
            "samples": m.num_samples,
            "steps": progress.get("step", m.steps),
            "max_steps": progress.get("max_steps", m.metrics.get("max_steps")),
            "train_loss": progress.get("loss", m.last_train_loss),
            "eval": eval_headline(m.eval),
            "reward": progress.get("reward", m.metrics.get("reward")),
            "rewards": progress.get("rewards") or m.metrics.get("rewards"),
            "tokens_per_second": progress.get(
                "tokens_per_second", m.metrics.get("tokens_per_second")
            ),
            "eta_seconds": progress.get("eta_seconds"),
            "kind": task.kind,
            "adapter": bool(m.adapter_path) and task.adapter_dir.exists(),
            "merged": bool(merged and merged.exists()),
            "updated": progress.get("updated_at", m.updated_at),
            "tracker": tracker_runs(m.tracking),
            "tracking": m.tracking,
        }


def tracker_runs(tracking: dict[str, Any]) -> str | None:
    """The task's tracker runs in one cell: ``wandb:<run path>``, ``mlflow:<run id>``."""
    labels = []
    if wandb := tracking.get("wandb"):
        labels.append(f"wandb:{wandb.get('path') or wandb.get('run_id')}")
    if mlflow := tracking.get("mlflow"):
        labels.append(f"mlflow:{mlflow.get('run_id')}")
    return ", ".join(labels) or None


def eval_headline(evaluation: dict[str, Any]) -> dict[str, Any] | None:
    """The latest evaluation's headline metric (``metric``) for the tuned and base model."""
    metric = evaluation.get("metric")
    if not metric:
        return None
    values = {side: (evaluation.get(side) or {}).get(metric) for side in ("tuned", "base")}
    return {"metric": metric, **values}


def scan_tasks(root: Path) -> list[TaskEntry]:
    """Every task directly under ``root``, sorted by name; unreadable metas are kept as broken."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [
        TaskEntry.read(child)
        for child in sorted(root.iterdir(), key=lambda p: p.name)
        if child.is_dir() and not child.name.startswith(".") and (child / META_FILENAME).exists()
    ]
