"""The run service: what a training run of a task will be, and starting it.

``plan_run(task, options)`` resolves everything before anything is loaded: the config (the
task's recorded one, then ``--preset``, a ``--config`` recipe file, ``--set`` settings, API
overrides and the named options, in that order), the runtime (device, precision,
quantization, optimizer), the memory estimate and whether it fits, whether the run resumes
or starts over, and the launch command of a multi-process run. It also lists what would stop
the run: another process training the task, a run predicted not to fit, an interrupted task
that would silently start over. ``start_run(plan)`` refuses for those reasons (``force``
overrides all but the lock) and trains.

``sage finetune run``, ``quickstart --run``, ``train_from_meta`` and ``python -m
sage_finetune_plugin.trainer`` all go through here, so they behave alike. Imports nothing
heavy at module level; never prints.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import TrainingConfig
from .errors import ConfigError, FinetuneError, LockError, TrainingError, UsageProblem
from .presets import apply_preset
from .task import Task
from .training.launch import LaunchOptions, launch_command, launch_config_path
from .training.memory import (
    DEFAULT_MARGIN,
    GIB,
    MemoryEstimate,
    available_memory,
    estimate_memory,
    fits,
)
from .training.runtime import Hardware, Runtime, resolve_runtime

if TYPE_CHECKING:
    from .data import DataStats
    from .training.callbacks import ProgressSink
    from .training.metrics import TrainResult

#: Statuses of a task whose checkpoints belong to a run that did not finish.
UNFINISHED = ("training", "interrupted", "failed")
#: ``--quant`` values and the config fields they set.
QUANTIZATION = {
    "4bit": {"load_in_4bit": True, "load_in_8bit": False},
    "8bit": {"load_in_4bit": False, "load_in_8bit": True},
    "none": {"load_in_4bit": False, "load_in_8bit": False},
}


@dataclass(frozen=True)
class RunOptions:
    """What the user asks of a run, on top of the task's recorded config.

    The named fields are the command line's shortcuts; ``settings`` are ``KEY=VALUE`` strings
    (``--set``), ``recipe`` a YAML or JSON file of config keys (``--config``), ``overrides``
    config keys given from Python (``train_from_meta(task, max_steps=100)``).
    """

    preset: str | None = None
    recipe: Path | None = None
    settings: tuple[str, ...] = ()
    overrides: Mapping[str, Any] = field(default_factory=dict)
    model: str | None = None
    epochs: float | None = None
    max_steps: int | None = None
    learning_rate: float | None = None
    max_length: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    lora_r: int | None = None
    quant: str | None = None  # "4bit", "8bit" or "none"
    resume: bool = False
    force: bool = False
    launch: LaunchOptions = field(default_factory=LaunchOptions)


@dataclass
class RunPlan:
    """Everything about a run decided before it starts (see ``plan_run``)."""

    task: Task
    options: RunOptions
    config: TrainingConfig
    hardware: Hardware
    runtime: Runtime
    #: The predicted peak and the memory available on the device (None if not estimated).
    memory: MemoryEstimate | None
    available: int | None
    #: The checkpoint a resumed run continues from (None: step 0).
    resume_from: Path | None
    #: Checkpoints of an earlier run that a fresh start removes.
    stale_checkpoints: int
    #: Why ``start_run`` would refuse, first reason first.
    blockers: list[FinetuneError] = field(default_factory=list)
    #: The command that starts this node's processes of a multi-process run.
    launch_command: list[str] | None = None

    @property
    def fits(self) -> bool | None:
        if self.memory is None or self.available is None:
            return None
        return fits(self.memory, self.available)

    def memory_verdict(self) -> str:
        """``fits: 1.2 GiB estimated peak (+10% margin), 20 GiB available on cpu``."""
        if self.memory is None or self.available is None:
            return "not estimated"
        return (
            f"{'fits' if self.fits else 'does not fit'}: {self.memory.total / GIB:.2f} GiB "
            f"estimated peak (+{DEFAULT_MARGIN:.0%} margin), {self.available / GIB:.2f} GiB "
            f"available on {self.memory.device}"
        )

    def check(self) -> None:
        """Raise the first reason the run cannot start."""
        if self.blockers:
            raise self.blockers[0]


def resolve_config(task: Task, options: RunOptions) -> TrainingConfig:
    """The config a run of ``task`` trains with (see the module docstring for the order).
    Values given on the command line that do not validate raise UsageProblem."""
    config = task.recorded_config(resume=options.resume)
    if options.preset is not None:
        config = apply_preset(config, options.preset)
    if options.recipe is not None:
        config = config.with_recipe(options.recipe)
    try:
        config = config.with_settings(options.settings)
        config = config.replace(**dict(options.overrides))
        config = _apply_shortcuts(config, options)
    except ConfigError as exc:
        raise UsageProblem(str(exc)) from None
    return task.with_task_paths(config)


def _apply_shortcuts(config: TrainingConfig, options: RunOptions) -> TrainingConfig:
    changes: dict[str, Any] = {
        key: value
        for key, value in {
            "model_name": options.model,
            "num_train_epochs": options.epochs,
            "max_steps": options.max_steps,
            "learning_rate": options.learning_rate,
            "max_length": options.max_length,
            "per_device_train_batch_size": options.batch_size,
            "gradient_accumulation_steps": options.grad_accum,
        }.items()
        if value is not None
    }
    if options.epochs is not None and options.max_steps is None:
        changes["max_steps"] = None  # the number of epochs decides the length
    if options.quant is not None:
        if options.quant not in QUANTIZATION:
            raise ConfigError(f"--quant must be one of {', '.join(QUANTIZATION)}.")
        changes.update(QUANTIZATION[options.quant])
    if options.lora_r is not None:  # keep the scaling alpha / r
        alpha = max(1, round(config.lora.lora_alpha * options.lora_r / config.lora.r))
        changes["lora"] = {"r": options.lora_r, "lora_alpha": alpha}
    return config.replace(**changes) if changes else config


def plan_run(
    task: Task | str | os.PathLike[str],
    options: RunOptions | None = None,
    *,
    hardware: Hardware | None = None,
) -> RunPlan:
    """Resolve a run of ``task`` without starting it (see the module docstring)."""
    task = Task.of(task)
    options = options or RunOptions()
    options.launch.validate()
    config = resolve_config(task, options)
    hardware = hardware or Hardware.detect()
    runtime = resolve_runtime(config, hardware)
    blockers: list[FinetuneError] = []
    if options.launch.node_rank == 0:  # node 0 holds the lock for a multi-node run
        try:
            task.lock().check()
        except LockError as exc:
            blockers.append(exc)

    memory = available = None
    try:
        memory = estimate_memory(config, hardware=hardware)
        available = available_memory(memory.device, hardware)
    except FinetuneError:
        if not options.force:
            raise
    plan = RunPlan(task, options, config, hardware, runtime, memory, available, None, 0)
    if plan.fits is False and not options.force:
        blockers.append(
            TrainingError(
                f"Predicted not to fit: {plan.memory_verdict()}. Lower --batch-size or "
                "--max-length, use --quant 4bit, pick a smaller --preset (or auto), or pass "
                "--force to try anyway."
            )
        )

    latest = task.latest_checkpoint()
    if options.resume:
        plan.resume_from = latest
    elif latest is not None and task.meta.status in UNFINISHED and not options.force:
        blockers.append(
            TrainingError(
                f"Training of {task.path} stopped at {latest.name} ({task.meta.status}): "
                "continue with --resume, or start over with --force."
            )
        )
    else:
        plan.stale_checkpoints = len(task.checkpoints())
    plan.blockers = blockers
    if options.launch.distributed:
        plan.launch_command = launch_command(
            task.path.resolve(),
            options.launch,
            launch_config_path(task.path.resolve()),
            resume=options.resume,
        )
    return plan


def start_run(
    plan: RunPlan,
    *,
    progress: ProgressSink | None = None,
    callbacks: Sequence[Any] | None = None,
) -> TrainResult | None:
    """Train as planned, after the plan's checks. Returns the result; None on the nodes of a
    multi-node run that do not hold rank 0 (their meta lives on node 0)."""
    plan.check()
    task, options = plan.task, plan.options
    if options.launch.distributed:
        from .training.launch import launch

        return launch(task, plan.config, options.launch, plan.hardware, resume=options.resume)
    from .training.recipe import LoRATrainer

    trainer = LoRATrainer(
        plan.config,
        task_dir=task,
        callbacks=callbacks,
        progress=progress,
        hardware=plan.hardware,
    )
    return trainer.train(resume_from_checkpoint=options.resume)


def train_from_meta(
    task_dir: Task | str | os.PathLike[str],
    *,
    preset: str | None = None,
    resume: bool = False,
    force: bool = False,
    callbacks: Sequence[Any] | None = None,
    progress: ProgressSink | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train a task with the hyperparameters recorded in its meta, ``preset`` and
    ``overrides`` (config keys) applied, with the same checks as ``sage finetune run``; the
    config used is written back to the meta."""
    options = RunOptions(preset=preset, overrides=overrides, resume=resume, force=force)
    result = start_run(plan_run(task_dir, options), progress=progress, callbacks=callbacks)
    assert result is not None  # a single-process run always returns its result
    return result


def run_worker(
    task_dir: str | os.PathLike[str],
    config_file: Path,
    resume: bool,
    *,
    progress: ProgressSink | None = None,
) -> TrainResult:
    """One rank of a multi-process run, started by the launcher: train the config the
    launcher resolved (its checks are done and it holds the lock)."""
    from .training.recipe import LoRATrainer

    config = TrainingConfig.load(config_file)
    trainer = LoRATrainer(config, task_dir=task_dir, progress=progress)
    return trainer.train(resume_from_checkpoint=resume)


def inspect_data(plan: RunPlan) -> DataStats:
    """Tokenize the planned run's data without caching it, for the statistics (dry run)."""
    from .data import prepare_dataset
    from .models import load_tokenizer

    config = plan.config
    if not config.data_path:
        raise FinetuneError(f"Task {plan.task.path} names no training data (data_path).")
    tokenizer = load_tokenizer(config.model_name, trust_remote_code=config.trust_remote_code)
    return prepare_dataset(config.data_path, tokenizer, config, cache_dir=None).stats


def cancel_run(
    task: Task | str | os.PathLike[str],
    *,
    wait: float | None = None,
    on_wait: Callable[[dict[str, Any]], None] | None = None,
) -> Task:
    """Stop the run of ``task`` as Ctrl-C does (a checkpoint at the end of the current step,
    status interrupted, resumable). With ``wait`` (seconds; 0 or less: no limit) wait until
    the run has let go of the task; ``on_wait`` is told whom we wait for. Returns the task
    with its meta re-read. TaskError if it is not training; TrainingError on a timeout."""
    task = Task.of(task)
    owner = task.request_cancel()
    if wait is None:
        return task
    if on_wait is not None:
        on_wait(owner)
    deadline = time.monotonic() + wait if wait > 0 else None
    while task.run_owner() is not None:
        if deadline is not None and time.monotonic() > deadline:
            raise TrainingError(
                f"Asked process {owner.get('pid')} to stop training {task.name!r}; it has not "
                f"finished its step after {wait:g} s. It stops at the end of the step; check "
                "with `sage finetune list`."
            )
        time.sleep(0.2)
    task.reload()
    return task
