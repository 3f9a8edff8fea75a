"""The task's books: what a training run writes into its task, kept in one place.

The training engine (training/recipe.py) trains and reports what happened (a ``TrainOutcome``);
``RunBooks`` writes it down: the run lock while the run lasts, the status (training, then
trained, interrupted or failed), the config as it ran, the live progress that ``list`` shows
(with the seconds left) and each logged step in ``progress.jsonl`` (the UI's live curve),
the metrics, the data statistics, the stages of the task (supervised tuning, then a preference
stage, ...), the loss plot, and the merged model a new adapter makes stale. Only the main
process of a multi-process run writes, and the launcher holds the lock for all ranks. Imports
nothing heavy (the plot imports matplotlib when it draws).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapters import adapter_for
from .checkpoints import latest_checkpoint
from .errors import FinetuneError, TrainingInterrupted
from .locks import RunLock
from .meta import DONE, TaskMeta, TaskStatus, load_meta, meta_path, now_iso, save_meta
from .paths import CANCEL_FILE, CHECKPOINTS_DIR, LOSS_PLOT, PROGRESS_LOG, atomic_write_text
from .task import Task

if TYPE_CHECKING:
    from .config import TrainingConfig
    from .progress import ProgressSink
    from .training.callbacks import RunProgress
    from .training.metrics import TrainOutcome, TrainResult

logger = logging.getLogger(__name__)


class RunBooks:
    """The books of the runs of one task directory (a Task, or a folder a bare config trains
    into, which gets a meta of its own)."""

    def __init__(self, task: Task | str | Path, *, forward: ProgressSink | None = None) -> None:
        self.task = task if isinstance(task, Task) else None
        self.task_dir = task.path if isinstance(task, Task) else Path(task)
        self.forward = forward
        self.notes: list[str] = []
        self.config: TrainingConfig | None = None
        #: When and at which step this session's training began (for the ETA).
        self._began: tuple[float, int] | None = None

    @property
    def writer(self) -> bool:
        """Whether this process keeps the books (rank 0 of a multi-process run)."""
        from .training.distributed import is_main_process

        return is_main_process()

    # --- a run ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def run(self, config: TrainingConfig, *, resume: bool) -> Iterator[RunBooks]:
        """Hold the run lock (rank 0, unless the launcher holds it), mark the task as training
        with ``config``, and record how the run ends: ``TrainingInterrupted`` with its outcome,
        Ctrl-C as interrupted, any other exception as failed."""
        self.config = config
        self.task_dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            self._update(
                status=TaskStatus.TRAINING,
                training=config.to_dict(),
                progress={},
                stages=self._stages_at_start(config, resume),
            )
            try:
                yield self
            except TrainingInterrupted as exc:
                if exc.outcome is not None:
                    self.record(exc.outcome, TaskStatus.INTERRUPTED)
                else:
                    self._mark(TaskStatus.INTERRUPTED)
                raise
            except KeyboardInterrupt:
                self._mark(TaskStatus.INTERRUPTED)
                raise TrainingInterrupted(self.interrupted_message()) from None
            except BaseException:
                self._mark(TaskStatus.FAILED)
                raise

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """The task's run lock, taken by rank 0 only, and not at all under ``launch`` (the
        launcher holds it for all ranks). A cancel request is only valid while it is held."""
        from .training.distributed import launched

        if launched() or not self.writer:
            yield
            return
        cancel_file = self.task_dir / CANCEL_FILE
        with RunLock(self.task_dir) as lock:
            if lock.took_over is not None:
                self.note(f"took over the stale lock of dead process {lock.took_over.get('pid')}")
            cancel_file.unlink(missing_ok=True)
            try:
                yield
            finally:
                cancel_file.unlink(missing_ok=True)

    def progress(self, progress: RunProgress) -> None:
        """Record the run's progress in the meta (for `list`: step, loss, speed, the estimated
        seconds left) and each logged step in the progress log; pass it on."""
        if progress.event == "start":
            self._began = (time.monotonic(), progress.step)
            self._log_progress(progress)
        if progress.event in ("start", "log"):
            self._update(
                progress={
                    "step": progress.step,
                    "max_steps": progress.max_steps,
                    "loss": progress.loss,
                    "tokens_per_second": round(progress.tokens_per_second, 1),
                    "eta_seconds": self._eta(progress),
                    "reward": progress.reward,
                    "rewards": progress.rewards() or None,
                    "updated_at": now_iso(),
                }
            )
        if progress.event == "log":
            self._log_progress(progress)
        if self.forward is not None:
            self.forward(progress)
        elif progress.event == "log":
            logger.info("%s", progress.line())

    def _eta(self, progress: RunProgress) -> float | None:
        """Seconds left at this session's pace so far (None before its first step)."""
        if self._began is None or progress.step <= self._began[1]:
            return None
        elapsed = time.monotonic() - self._began[0]
        pace = elapsed / (progress.step - self._began[1])
        return round(pace * max(progress.max_steps - progress.step, 0), 1)

    def _log_progress(self, progress: RunProgress) -> None:
        """Append a logged step to the progress log; a run's start drops the lines of later
        steps (a fresh run: all of them; a resumed one: those after its checkpoint)."""
        if not self.writer:
            return
        path = self.task_dir / PROGRESS_LOG
        if progress.event == "start":
            kept = [
                line
                for line in _read_lines(path)
                if json.loads(line).get("step", 0) <= progress.step
            ]
            atomic_write_text(path, "".join(f"{line}\n" for line in kept))
            return
        record = {"step": progress.step, "time": round(time.time(), 3), **progress.logs}
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def finish(self, outcome: TrainOutcome) -> TrainResult:
        """Record a finished run; the result the caller gets."""
        from .training.metrics import TrainResult

        metrics = self.record(outcome, TaskStatus.TRAINED)
        return TrainResult(
            self.task_dir,
            self.task_dir / adapter_for(outcome.config).folder,
            metrics,
            outcome.config,
            outcome.target_modules,
            metrics["notes"],
        )

    def record(self, outcome: TrainOutcome, status: TaskStatus) -> dict[str, Any]:
        """The outcome's metrics, the config as it ran, the data statistics, the stages and the
        loss plot into the books; returns the metrics as recorded."""
        if status == TaskStatus.TRAINED:
            self._stale_merge()
        metrics = {**outcome.metrics, "notes": [*outcome.notes, *self.notes]}
        changes: dict[str, Any] = {
            "status": status,
            "training": outcome.config.to_dict(),
            "metrics": metrics,
            "stages": self._stages_at_end(status, metrics, outcome),
        }
        if status == TaskStatus.TRAINED:
            changes["adapter_path"] = adapter_for(outcome.config).folder
            if self.task is not None and self.task.merged_dir:
                changes["merged_path"] = None
        if outcome.data_stats is not None:
            changes["data_stats"] = outcome.data_stats.to_dict()
            changes["num_samples"] = outcome.data_stats.samples + outcome.data_stats.eval_samples
        self._update(**changes)
        if self.writer:
            self._plot(outcome.config, metrics)
        return metrics

    def tracking(self) -> dict[str, Any]:
        """The tracker runs recorded for the task (W&B and MLflow run ids, per tracker)."""
        meta = self._meta()
        return dict(meta.tracking) if meta is not None else {}

    def record_tracking(self, records: dict[str, Any]) -> None:
        """Keep the run's tracker runs in the meta (``run --resume`` and ``eval`` reopen them)."""
        self._update(tracking=records)

    def note(self, text: str) -> None:
        self.notes.append(text)
        logger.warning("Note: %s", text)

    def interrupted_message(self, saved: Any = None) -> str:
        """How to go on after an interruption (``saved``: the trainer state at the stop)."""
        checkpoint = latest_checkpoint(self.task_dir / CHECKPOINTS_DIR)
        where = (
            f"checkpoint saved at step {saved.global_step} of {saved.max_steps}"
            if saved is not None
            else f"last checkpoint: {checkpoint.name}"
            if checkpoint
            else "no checkpoint yet"
        )
        return (
            f"Training of {self.task_dir} interrupted ({where}): continue with "
            f"`sage finetune run {self.task_dir} --resume`."
        )

    # --- the pieces ----------------------------------------------------------------------------

    def _stale_merge(self) -> None:
        merged = self.task.merged_dir if self.task is not None else None
        if merged:  # chat would otherwise answer with the model from before this run
            self.note(
                f"the merged model in {merged} predates this run: rebuild it with "
                f"`sage finetune merge {self.task_dir} --force`"
            )

    def _plot(self, config: TrainingConfig, metrics: Mapping[str, Any]) -> None:
        from .plots import plot_loss

        plot = plot_loss(
            metrics["loss_history"],
            metrics["eval_loss_history"],
            self.task_dir / LOSS_PLOT,
            f"{self.task_dir.name}: {config.model_name} ({config.method})",
            rewards=metrics.get("reward_history"),
            eval_rewards=metrics.get("eval_reward_history"),
        )
        logger.info("Loss curve: %s", plot)

    def _stages_at_start(self, config: TrainingConfig, resume: bool) -> list[dict[str, Any]]:
        """The meta's stages as this run begins: a resumed run goes on with its stage, a run
        that continues an adapter (``init_adapter``) adds a stage after the finished ones,
        any other run starts the list over."""
        meta = self._meta()
        stages = [dict(stage) for stage in meta.stages] if meta is not None else []
        if resume and stages and stages[-1].get("method") == config.method:
            stages[-1]["status"] = TaskStatus.TRAINING
            return stages
        stage = {
            "method": config.method,
            "data": self._relative(config.data_path),
            "start": "adapter" if config.init_adapter else "base model",
            "status": TaskStatus.TRAINING,
            "started_at": now_iso(),
        }
        if not config.init_adapter:
            return [stage]
        if not stages and meta is not None and meta.status in DONE:
            # An adapter trained before stages were recorded.
            stages = [
                {
                    "method": meta.training.get("method", "sft"),
                    "data": self._relative(meta.training.get("data_path")),
                    "status": TaskStatus.TRAINED,
                    "steps": meta.steps,
                }
            ]
        return [*(s for s in stages if s.get("status") == TaskStatus.TRAINED), stage]

    def _stages_at_end(
        self, status: TaskStatus, metrics: Mapping[str, Any], outcome: TrainOutcome
    ) -> list[dict[str, Any]]:
        from .methods import get_method

        keys = get_method(outcome.config.method).stage_metrics
        return self._stages_marked(
            status,
            steps=metrics["global_step"],
            finished_at=now_iso(),
            **{key: metrics[key] for key in keys if metrics.get(key) is not None},
        )

    def _mark(self, status: TaskStatus) -> None:
        self._update(status=status, stages=self._stages_marked(status))

    def _stages_marked(self, status: TaskStatus, **fields: Any) -> list[dict[str, Any]]:
        """The meta's stages with this run's (the last) given ``status`` and ``fields``."""
        stages = [dict(stage) for stage in self.task.meta.stages] if self.task else []
        if stages:
            stages[-1].update(status=status, **fields)
        return stages

    def _meta(self) -> TaskMeta | None:
        """The task's meta as it is (None for a folder without a readable one)."""
        meta = self.task.meta if self.task is not None else None
        if meta is None and meta_path(self.task_dir).exists():
            with contextlib.suppress(FinetuneError):
                meta = load_meta(self.task_dir)
        return meta

    def _relative(self, path: str | None) -> str | None:
        """A path inside the task relative to it (as the meta stores its own files)."""
        if not path:
            return path
        with contextlib.suppress(ValueError):
            return str(Path(path).resolve().relative_to(self.task_dir.resolve()))
        return path

    def _update(self, **changes: Any) -> None:
        """Change the task's meta (rank 0 only), creating one for a run started from a bare
        config."""
        if not self.writer:
            return
        config = self.config
        assert config is not None
        if self.task is None:
            if not meta_path(self.task_dir).exists():
                save_meta(
                    self.task_dir,
                    TaskMeta(
                        model=config.model_name,
                        dataset=config.data_path,
                        output_dir=".",
                        preset=config.preset,
                    ),
                )
            self.task = Task(self.task_dir)
        self.task.update(**changes, model=config.model_name, preset=config.preset)


def _read_lines(path: Path) -> list[str]:
    """The JSON lines of a progress log (none when it is missing; a torn last line dropped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    lines = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            if isinstance(json.loads(line), dict):
                lines.append(line)
    return lines


def progress_history(task_dir: Path) -> list[dict[str, Any]]:
    """The logged steps of the task's run, oldest first (see ``PROGRESS_LOG``)."""
    return [json.loads(line) for line in _read_lines(Path(task_dir) / PROGRESS_LOG)]
