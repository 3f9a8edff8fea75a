"""``finetune_meta.json``: the one record of a task, and its only owner.

Every read and write of the meta file goes through this module. Writes are atomic (a temp
file in the same directory, then ``os.replace``), so a crash never leaves half a file. A
corrupt file is reported with its path and never overwritten by an update.

Keys the original SAGE tool wrote (``task_type``, ``model``, ``framework``, ``format``,
``dataset``, ``config``, ``output_dir``, ``code_root``, ``data_file``) are kept; metas that
hold only those still load. Keys this version does not know are kept as they are.

``metrics`` holds what training measured; the keys the other commands read are
``global_step``, ``epochs``, ``train_loss`` (last logged), ``eval_loss``, ``loss_history``
(list of ``{"step", "loss"}``), ``tokens_per_second``, ``wall_time_s`` and
``peak_memory_bytes``. ``progress`` is rewritten at every logging step of a run (``step``,
``max_steps``, ``loss``, ``tokens_per_second``, ``updated_at``), so ``list`` can show it.
``stages`` lists the runs that built the adapter when one continued another (supervised
tuning, then a preference stage); a run that starts over leaves one stage.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from ._version import __version__
from .config import allowed_types
from .errors import MetaError
from .paths import META_FILENAME, atomic_write_text

SCHEMA_VERSION = 1


class TaskStatus(StrEnum):
    """Where a task stands; the values are what ``finetune_meta.json`` holds. A stage of the
    task (``stages``) has one too."""

    PREPARED = "prepared"
    TRAINING = "training"
    INTERRUPTED = "interrupted"
    FAILED = "failed"
    TRAINED = "trained"
    MERGED = "merged"


STATUSES = tuple(TaskStatus)
#: Statuses of a task whose checkpoints belong to a run that did not finish.
UNFINISHED = (TaskStatus.TRAINING, TaskStatus.INTERRUPTED, TaskStatus.FAILED)
#: Statuses of a task with a trained adapter.
DONE = (TaskStatus.TRAINED, TaskStatus.MERGED)


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


@dataclass
class TaskMeta:
    """The contents of ``finetune_meta.json``."""

    # Keys of the original SAGE tool.
    task_type: str = "custom"
    model: str = ""
    framework: str = "peft"
    format: str | None = None
    dataset: str | None = None
    config: str | None = None
    output_dir: str | None = None
    code_root: str | None = None
    data_file: str | None = None
    # Added by this plugin.
    schema_version: int = SCHEMA_VERSION
    plugin_version: str = __version__
    created_at: str = field(default_factory=now_iso)
    updated_at: str = field(default_factory=now_iso)
    status: str = TaskStatus.PREPARED
    preset: str | None = None
    #: Prepared samples, training and evaluation together.
    num_samples: int | None = None
    data_stats: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    #: What ``eval`` measured last: base and tuned metrics, data, samples, report path.
    eval: dict[str, Any] = field(default_factory=dict)
    #: The latest state of the run in progress (or of the last run): step, loss, speed.
    progress: dict[str, Any] = field(default_factory=dict)
    adapter_path: str | None = None
    merged_path: str | None = None
    #: What ``merge`` recorded: dtype, size in bytes, checkpoint, logits check.
    merge: dict[str, Any] = field(default_factory=dict)
    #: The experiment-tracker runs of the task's last run, per tracker (``mlflow``: run_id,
    #: experiment_id, tracking_uri; ``wandb``: run_id, project, entity, path, dir, mode), so that
    #: ``run --resume`` and ``eval`` log into the same runs.
    tracking: dict[str, Any] = field(default_factory=dict)
    #: What ``export`` wrote, by file name: type, size, who wrote it, how it read back.
    exports: dict[str, Any] = field(default_factory=dict)
    #: The training stages that made the adapter, oldest first (``sft``, then ``dpo``, ...):
    #: method, data, status, steps, what it started from, its last metrics.
    stages: list[dict[str, Any]] = field(default_factory=list)
    #: Keys this version does not know, written back unchanged.
    extra: dict[str, Any] = field(default_factory=dict)

    # --- conversion ---------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "meta") -> TaskMeta:
        if not isinstance(data, dict):
            raise MetaError(
                f"{source}: expected a JSON object, found {type(data).__name__}. "
                "Fix or remove the file, or recreate the task with `quickstart --force`."
            )
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        for name, expected in _TYPES.items():
            if (
                name in values
                and values[name] is not None
                and not isinstance(values[name], expected)
            ):
                raise MetaError(
                    f"{source}: key {name!r} should be {_type_name(expected)}, "
                    f"found {type(values[name]).__name__}. Fix the file or recreate the task."
                )
        if values.get("status") not in (None, *STATUSES):
            raise MetaError(
                f"{source}: unknown status {values['status']!r} "
                f"(expected one of {', '.join(STATUSES)})."
            )
        # Drop nulls so dataclass defaults apply to fields an older writer left empty.
        values = {k: v for k, v in values.items() if v is not None or k in _NULLABLE}
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        extra = data.pop("extra")
        return {**extra, **data}

    # --- convenience for readers ------------------------------------------------------------

    def path(self, task_dir: Path, value: str | None) -> Path | None:
        """A path stored in the meta, resolved against the task directory."""
        if not value:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else task_dir / p

    @property
    def last_train_loss(self) -> float | None:
        loss = self.metrics.get("train_loss")
        if loss is None and self.metrics.get("loss_history"):
            loss = self.metrics["loss_history"][-1].get("loss")
        return loss if isinstance(loss, int | float) else None

    @property
    def steps(self) -> int | None:
        step = self.metrics.get("global_step")
        return step if isinstance(step, int) else None


def _field_types() -> dict[str, tuple[type, ...]]:
    """The JSON types each meta key may hold, from the TaskMeta annotations."""
    hints = typing.get_type_hints(TaskMeta)
    types = {}
    for f in dataclasses.fields(TaskMeta):
        allowed = allowed_types(hints[f.name])
        if f.name != "extra" and allowed is not None:
            types[f.name] = tuple(t for t in allowed if t is not type(None))
    return types


_TYPES = _field_types()
_NULLABLE = {f.name for f in dataclasses.fields(TaskMeta) if f.default is None}


def _type_name(expected: tuple[type, ...]) -> str:
    names = {"str": "a string", "int": "an integer", "dict": "an object", "list": "an array"}
    return " or ".join(names.get(t.__name__, t.__name__) for t in expected)


def meta_path(task_dir: Path) -> Path:
    return Path(task_dir) / META_FILENAME


def load_meta(task_dir: Path) -> TaskMeta:
    """Read a task's meta, or raise MetaError naming the file and the problem."""
    path = meta_path(task_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MetaError(f"{path}: no such file; is {task_dir} a task directory?") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MetaError(f"{path}: cannot read ({exc}).") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MetaError(
            f"{path}: corrupt JSON at line {exc.lineno}, column {exc.colno} ({exc.msg}). "
            "Fix the file, or recreate the task with `quickstart --force`."
        ) from None
    return TaskMeta.from_dict(data, source=str(path))


def save_meta(task_dir: Path, meta: TaskMeta) -> TaskMeta:
    """Write a task's meta atomically, stamping the time and the plugin version."""
    meta.updated_at = now_iso()
    meta.plugin_version = __version__
    meta.schema_version = SCHEMA_VERSION
    atomic_write_text(meta_path(task_dir), json.dumps(meta.to_dict(), indent=2) + "\n")
    return meta


def update_meta(task_dir: Path, **changes: Any) -> TaskMeta:
    """Load, change some fields, save. A corrupt meta raises and is left untouched."""
    meta = load_meta(task_dir)
    for key, value in changes.items():
        if key not in _TYPES:
            raise MetaError(f"update_meta: unknown meta key {key!r}.")
        if key == "status" and value not in STATUSES:
            raise MetaError(f"update_meta: unknown status {value!r}.")
        setattr(meta, key, value)
    return save_meta(task_dir, meta)
