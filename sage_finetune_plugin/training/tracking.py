"""The run's experiment trackers: transformers' integrations, logging into runs we open.

``TrackerRuns`` opens the W&B and MLflow runs of a training run before the Trainer starts
(named after the task, with ids kept in the meta: ``run --resume`` continues the same runs),
logs what the Trainer does not know (the resolved config, the adapter, the runtime, the data
statistics) and closes them with the run's outcome. The logging itself is transformers'
``TensorBoardCallback``, ``WandbCallback`` and ``MLflowCallback``, which find the open run;
the Trainer adds the tokens per second to each logging step (``train_tokens_per_second``).
Only the main process of a multi-process run opens runs and logs. See tracking.py for where
runs go by default.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import TrainingError, TrainingInterrupted
from ..paths import LOGS_DIR
from ..tracking import (
    MLFLOW_ARTIFACTS,
    WANDB_DIR,
    environment,
    local_store,
    mlflow_experiment,
    mlflow_uri,
    tracker_blockers,
    wandb_project,
)
from .distributed import is_main_process, world_size

if TYPE_CHECKING:
    from ..books import RunBooks
    from ..config import TrainingConfig
    from ..data import DataStats
    from .runtime import Runtime

logger = logging.getLogger(__name__)


class TrackerRuns:
    """The tracker runs of one training run of the task in ``task_dir`` (``books`` keep their
    ids in the meta)."""

    def __init__(self, config: TrainingConfig, task_dir: Path, books: RunBooks) -> None:
        self.config = config
        self.task_dir = Path(task_dir)
        self.books = books
        self.active = bool(config.report_to) and is_main_process()
        self.records: dict[str, dict[str, Any]] = {}

    def check(self) -> None:
        """Raise the first missing tracker package (one line naming the extra)."""
        for blocker in tracker_blockers(self.config) if self.active else []:
            raise blocker

    def callbacks(self) -> list[Any]:
        """transformers' integrations for the configured trackers (none on other ranks)."""
        if not self.active:
            return []
        self.check()
        found: list[Any] = []
        if "tensorboard" in self.config.report_to:
            from torch.utils.tensorboard import SummaryWriter
            from transformers.integrations import TensorBoardCallback

            writer = SummaryWriter(log_dir=str(self.task_dir / LOGS_DIR))
            found.append(TensorBoardCallback(tb_writer=writer))
        if "mlflow" in self.config.report_to:
            from transformers.integrations import MLflowCallback

            found.append(MLflowCallback())
        if "wandb" in self.config.report_to:
            from transformers.integrations import WandbCallback

            found.append(WandbCallback())
        return found

    @contextlib.contextmanager
    def running(self, params: Mapping[str, Any], *, resume: bool) -> Iterator[TrackerRuns]:
        """Open (or, with ``resume``, reopen) the runs, log ``params`` into them, and close
        them with the block's outcome: finished, killed (interrupted) or failed."""
        if not self.active:
            if is_main_process():
                self.books.record_tracking({})  # no runs of an earlier run shown as this one's
            yield self
            return
        self.check()
        self.records = {}
        previous = dict(self.books.tracking()) if resume else {}
        uri = mlflow_uri(self.config, self.task_dir)
        mlflow_run = previous.get("mlflow") or {}
        reopened = mlflow_run.get("run_id") if mlflow_run.get("tracking_uri") == uri else None
        mlflow_id = reopened or os.environ.get("MLFLOW_RUN_ID")  # $MLFLOW_RUN_ID: attach to it
        # MLflowCallback would start a run of its own for $MLFLOW_RUN_ID (ours is open), and a
        # reopened run has the Trainer's parameters already (MLflow keeps the first value of
        # each; the changes of ours are tagged sage.resumed.*).
        hidden: dict[str, str | None] = {"MLFLOW_RUN_ID": None}
        if reopened:
            hidden["MLFLOW_MAX_LOG_PARAMS"] = "0"
        self.outcome = "FAILED"
        with contextlib.ExitStack() as stack:
            stack.enter_context(environment(**hidden))
            if "mlflow" in self.config.report_to:
                with _opening("mlflow", "MLflow", "mlflow_tracking_uri or $MLFLOW_TRACKING_URI"):
                    self.records["mlflow"] = self._open_mlflow(uri, mlflow_id, params)
                stack.callback(self._close_mlflow)
            if "wandb" in self.config.report_to:
                with _opening("wandb", "W&B", "`wandb login`, or WANDB_MODE=offline"):
                    self.records["wandb"] = self._open_wandb(previous.get("wandb"), params)
                stack.callback(self._close_wandb)
            if "tensorboard" in self.config.report_to:
                self._tensorboard_params(params)
            self.books.record_tracking(self.records)
            try:
                yield self
            except (TrainingInterrupted, KeyboardInterrupt):
                self.outcome = "KILLED"
                raise
            self.outcome = "FINISHED"

    # --- MLflow ----------------------------------------------------------------------------------

    def _open_mlflow(self, uri: str, run_id: str | None, params: Mapping[str, Any]) -> dict:
        """Start the MLflow run in ``uri`` (reopen ``run_id`` when given)."""
        import mlflow

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating tables"
        mlflow.set_tracking_uri(uri)
        if mlflow.active_run() is not None:  # left open by a run that crashed in this process
            mlflow.end_run("FAILED")
        if run_id:
            run = mlflow.start_run(run_id=run_id)
        else:
            run = mlflow.start_run(
                experiment_id=self._mlflow_experiment(uri),
                run_name=self.task_dir.name,
                tags={"sage.task": str(self.task_dir.resolve()), "sage.method": self.config.method},
            )
        logged = run.data.params
        values = {_key(k): _param(v) for k, v in params.items()}
        fresh = {k: v for k, v in values.items() if k not in logged}
        changed = {f"sage.resumed.{k}": v for k, v in values.items() if logged.get(k, v) != v}
        if fresh:
            mlflow.log_params(fresh)
        if changed:  # MLflow keeps a parameter's first value: tag what the resumed run changed
            mlflow.set_tags(changed)
        info = run.info
        logger.info("MLflow run %s in %s", info.run_id, uri)
        return {
            "run_id": info.run_id,
            "experiment_id": info.experiment_id,
            "tracking_uri": uri,
            "run_name": info.run_name,
        }

    def _mlflow_experiment(self, uri: str) -> str:
        """The experiment's id, created with its artefacts beside a local store."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        name = mlflow_experiment(self.config)
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return str(experiment.experiment_id)
        folder = local_store(uri)
        location = (folder / MLFLOW_ARTIFACTS).resolve().as_uri() if folder else None
        return str(client.create_experiment(name, artifact_location=location))

    def _close_mlflow(self) -> None:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.end_run(self.outcome)

    # --- W&B -------------------------------------------------------------------------------------

    def _open_wandb(self, previous: dict[str, Any] | None, params: Mapping[str, Any]) -> dict:
        import wandb

        project = wandb_project(self.config)
        run_id = previous.get("run_id") if previous else None
        folder = os.environ.get("WANDB_DIR") or str(self.task_dir / WANDB_DIR)
        Path(folder).mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            id=run_id or uuid.uuid4().hex[:12],
            resume="allow",
            project=project,
            name=self.task_dir.name,
            dir=folder,
            settings=wandb.Settings(console="off", silent=True),
        )
        run.config.update(dict(params), allow_val_change=True)  # a resumed run may change some
        entity = run.entity or None
        logger.info("W&B run %s (%s)", run.id, run.settings.mode)
        return {
            "run_id": run.id,
            "project": project,
            "entity": entity,
            "path": "/".join(p for p in (entity, project, run.id) if p),
            "dir": folder,
            "mode": run.settings.mode,
            "run_dir": run.dir and str(Path(run.dir).parent),
        }

    def _close_wandb(self) -> None:
        import wandb

        if wandb.run is not None:
            wandb.run.finish(exit_code=0 if self.outcome == "FINISHED" else 1)

    # --- TensorBoard ----------------------------------------------------------------------------

    def _tensorboard_params(self, params: Mapping[str, Any]) -> None:
        """The parameters as a text panel (TensorBoardCallback adds the Trainer's own)."""
        import json

        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(self.task_dir / LOGS_DIR))
        try:
            text = json.dumps({k: _param(v) for k, v in params.items()}, indent=1)
            writer.add_text("sage_finetune/params", f"```\n{text}\n```")
        finally:
            writer.close()


@contextlib.contextmanager
def _opening(name: str, tracker: str, advice: str) -> Iterator[None]:
    """A tracker that cannot open its run (a server down, a bad URI, no login) stops the run
    in one line, before the first step."""
    try:
        yield
    except Exception as exc:
        text = str(exc).strip()
        detail = text.splitlines()[0].rstrip(".") if text else type(exc).__name__
        raise TrainingError(
            f"Cannot open the {tracker} run: {detail}. Check {advice}, or leave "
            f"{name} out of report_to."
        ) from None


def run_params(
    config: TrainingConfig, runtime: Runtime, data_stats: DataStats | None
) -> dict[str, Any]:
    """What a run logs as its parameters, the same in every tracker: every setting as it ran
    (``config/...``, the adapter's as ``config/lora.r``, ...), the runtime (``runtime/...``:
    device, precision, quantization, optimizer, processes) and the data statistics
    (``data/...``)."""
    params: dict[str, Any] = dict(_flat(config.to_dict(), "config/"))
    params.update(
        {
            "runtime/device": runtime.device,
            "runtime/precision": runtime.dtype_name,
            "runtime/quantization": runtime.quantization or "none",
            "runtime/optim": runtime.optim,
            "runtime/world_size": world_size(),
        }
    )
    if data_stats is not None:
        params.update(_flat(data_stats.to_dict(), "data/"))
    return params


def _flat(values: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, Any]]:
    for key, value in values.items():
        if isinstance(value, Mapping) and value and key == "lora":
            yield from _flat(value, f"{prefix}{key}.")
        elif isinstance(value, Mapping) and value:
            yield from _flat(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def _param(value: Any) -> str:
    """A parameter as MLflow stores it (a string, within its length limit), lists and None
    included."""
    text = "none" if value is None else str(value)
    return text if len(text) <= _MAX_PARAM else text[: _MAX_PARAM - 3] + "..."


def _key(key: str) -> str:
    """A parameter name with only the characters MLflow allows."""
    return re.sub(r"[^0-9A-Za-z_\-. /:]", "_", key)


_MAX_PARAM = 500
