"""Experiment trackers: TensorBoard, Weights & Biases and MLflow, fed from the same run.

A run logs through transformers' own integrations (``TensorBoardCallback``, ``WandbCallback``,
``MLflowCallback``); training/tracking.py opens the runs they log into. This module holds what
the other commands need without training: the package each tracker needs (one line naming the
extra when it is missing), where runs go by default (the dry run's lines), and logging later
into the runs whose records the task's meta keeps (``tracking``: the W&B run id, the MLflow run
id and store): ``eval``'s results, the artefacts after a run.

Where runs go unless told otherwise:

- TensorBoard: ``<task>/logs``.
- W&B: project ``tracker_project``, else ``$WANDB_PROJECT``, else ``sage-finetune``; run
  folders under ``<task>/logs/wandb`` (``$WANDB_DIR`` moves them); ``$WANDB_MODE=offline``
  keeps everything local until ``wandb sync``.
- MLflow: the store ``mlflow_tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the SQLite
  database ``mlflow.db`` in the folder that holds the task (the task root), artefacts beside it
  in ``mlartifacts``; experiment ``tracker_project``, else ``$MLFLOW_EXPERIMENT_NAME``, else
  ``sage-finetune``.

Imports nothing heavy: mlflow, wandb and tensorboard are imported inside the functions that log.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .deps import require
from .errors import DependencyError, FinetuneError
from .paths import LOGS_DIR

if TYPE_CHECKING:
    from .config import TrainingConfig
    from .task import Task

logger = logging.getLogger(__name__)

#: The import name of the package each tracker needs (deps.EXTRAS names the extra).
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
#: The W&B project and MLflow experiment when neither the setting nor the environment names one.
DEFAULT_PROJECT = "sage-finetune"
#: The default MLflow store: a SQLite database in the task root, artefacts beside it.
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
#: Where W&B writes its run folders inside the task (under ``wandb/``) unless $WANDB_DIR says.
WANDB_DIR = LOGS_DIR


def tracker_blockers(config: TrainingConfig) -> list[FinetuneError]:
    """A DependencyError (one line naming the extra) for each tracker of ``config.report_to``
    whose package is not installed."""
    blockers: list[FinetuneError] = []
    for name in config.report_to:
        try:
            require(TRACKER_MODULES[name])
        except DependencyError as exc:
            blockers.append(exc)
    return blockers


def wandb_project(config: TrainingConfig) -> str:
    return config.tracker_project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT


def mlflow_experiment(config: TrainingConfig) -> str:
    return config.tracker_project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT


def mlflow_uri(config: TrainingConfig, task_dir: Path) -> str:
    """The MLflow tracking store of a run of the task in ``task_dir``."""
    uri = config.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(task_dir).resolve().parent / MLFLOW_DB}"


def local_store(uri: str) -> Path | None:
    """The folder that holds a local MLflow store (a SQLite file or a folder), None for a
    server."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent
    if uri.startswith("file:"):
        return Path(uri.removeprefix("file://").removeprefix("file:"))
    if "://" not in uri:
        return Path(uri)
    return None


def destinations(
    config: TrainingConfig, task_dir: Path, tracking: Mapping[str, Any] | None = None
) -> list[str]:
    """Where a run of ``config`` in ``task_dir`` logs, one line per tracker (the dry run);
    with ``tracking`` (the meta's records, for a resumed run) the runs it continues."""
    tracking = tracking or {}
    lines = []
    for name in config.report_to:
        if name == "tensorboard":
            lines.append(f"TensorBoard: {Path(task_dir) / LOGS_DIR}")
        elif name == "mlflow":
            uri = mlflow_uri(config, task_dir)
            same = (tracking.get("mlflow") or {}).get("tracking_uri") == uri
            go_on = f", continues run {tracking['mlflow']['run_id']}" if same else ""
            lines.append(f"MLflow: {uri}, experiment {mlflow_experiment(config)}{go_on}")
        elif name == "wandb":
            mode = os.environ.get("WANDB_MODE") or "online"
            folder = os.environ.get("WANDB_DIR") or str(Path(task_dir) / WANDB_DIR)
            run = (tracking.get("wandb") or {}).get("run_id")
            go_on = f", continues run {run}" if run else ""
            lines.append(
                f"W&B: project {wandb_project(config)}, {mode} (run folders in "
                f"{Path(folder) / 'wandb'}){go_on}"
            )
    return lines


@contextlib.contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set (a string) or remove (None) environment variables for the block, then restore them."""
    before = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def numbers(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) mapping, flattened with ``/``: what trackers take as
    metrics."""
    found: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            found.update(numbers(value, f"{name}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            found.update({name: float(value)} if math.isfinite(value) else {})
    return found


# --- logging into the task's runs later ---------------------------------------------------------


def log_to_task_runs(
    task: Task,
    metrics: Mapping[str, float] | None = None,
    *,
    files: Sequence[Path] = (),
    step: int | None = None,
) -> list[str]:
    """Log ``metrics`` (at ``step``: by default the task's last training step) and ``files``
    (artefacts: W&B and MLflow only) into the tracker runs of the task's last run, reopened by
    the ids in the meta. A tracker that cannot be reached does not stop the caller: returns one
    note per tracker that failed."""
    tracking = task.meta.tracking
    config = task.recorded_config(resume=True)
    step = task.meta.steps if step is None else step
    notes = []
    for name in config.report_to:
        record = tracking.get(name) if name != "tensorboard" else {"logdir": LOGS_DIR}
        if not record:
            continue
        try:
            require(TRACKER_MODULES[name])
            _LATER[name](task, record, dict(metrics or {}), list(files), step or 0)
        except Exception as exc:  # a tracker down must not lose what the command did
            notes.append(f"not logged to {name}: {str(exc).splitlines()[0] if str(exc) else exc!r}")
            logger.warning("Note: %s", notes[-1])
    return notes


def _tensorboard_later(
    task: Task, record: dict[str, Any], metrics: dict[str, float], files: list[Path], step: int
) -> None:
    if not metrics:
        return
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(task.path / record["logdir"]))
    try:
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)
    finally:
        writer.close()


def _mlflow_later(
    task: Task, record: dict[str, Any], metrics: dict[str, float], files: list[Path], step: int
) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=record["tracking_uri"])
    run_id = record["run_id"]
    if metrics:
        import time

        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])
    for path in files:
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=path.name)
        elif path.exists():
            client.log_artifact(run_id, str(path))


def _wandb_later(
    task: Task, record: dict[str, Any], metrics: dict[str, float], files: list[Path], step: int
) -> None:
    import wandb

    run = wandb.init(
        id=record["run_id"],
        resume="allow",
        project=record.get("project"),
        entity=record.get("entity") or None,
        dir=record.get("dir"),
        mode=record.get("mode") or None,
        settings=wandb.Settings(console="off", silent=True),
    )
    try:
        if metrics:
            run.log(metrics)
            run.summary.update(metrics)
        for path in files:
            if not path.exists():
                continue
            artifact = wandb.Artifact(f"{task.name}-{path.stem}", type="result")
            if path.is_dir():
                artifact.add_dir(str(path))
            else:
                artifact.add_file(str(path))
            run.log_artifact(artifact)
    finally:
        run.finish()


_LATER = {"tensorboard": _tensorboard_later, "mlflow": _mlflow_later, "wandb": _wandb_later}
