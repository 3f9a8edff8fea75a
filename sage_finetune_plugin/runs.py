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

import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapters import adapter_for
from .checkpoints import is_complete_adapter
from .config import TrainingConfig, apply_flags, flags
from .errors import (
    ConfigError,
    FinetuneError,
    LockError,
    TaskError,
    TrainingError,
    UsageProblem,
)
from .meta import UNFINISHED, TaskStatus
from .methods import get_method
from .presets import apply_preset
from .progress import ProgressSink, Status
from .task import Task
from .tracking import tracker_blockers
from .training.launch import LaunchOptions, launch_command, launch_config_path
from .training.memory import (
    DEFAULT_MARGIN,
    GIB,
    MemoryEstimate,
    available_memory,
    estimate_memory,
    fits,
)
from .training.runtime import TORCH_OPTIMIZERS, Hardware, Runtime, resolve_runtime

if TYPE_CHECKING:
    from .data import DataStats, PreparedDataset
    from .training.metrics import TrainResult

#: ``--quant`` values and the config fields they set.
QUANTIZATION = {
    "4bit": {"load_in_4bit": True, "load_in_8bit": False},
    "8bit": {"load_in_4bit": False, "load_in_8bit": True},
    "none": {"load_in_4bit": False, "load_in_8bit": False},
}


@dataclass(frozen=True)
class RunOptions:
    """What the user asks of a run, on top of the task's recorded config.

    ``settings`` are ``KEY=VALUE`` strings (``--set``), ``recipe`` a YAML or JSON file of
    config keys (``--config``), ``overrides`` config keys given from Python
    (``train_from_meta(task, max_steps=100)``), ``flags`` the config keys set by the command
    line's named options (``--lr``: ``{"learning_rate": 1e-4}``), applied last with their rules
    (``config.Flag``). The fields from ``model`` to ``skip_invalid`` are the same named options
    as Python keywords (each setting's ``Flag.keyword``); ``quant`` sets the quantization,
    ``data`` other training data (a new stage of the task).
    """

    preset: str | None = None
    recipe: Path | None = None
    settings: tuple[str, ...] = ()
    overrides: Mapping[str, Any] = field(default_factory=dict)
    flags: Mapping[str, Any] = field(default_factory=dict)
    model: str | None = None
    epochs: float | None = None
    max_steps: int | None = None
    learning_rate: float | None = None
    max_length: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    lora_r: int | None = None
    quant: str | None = None  # "4bit", "8bit" or "none"
    #: Another training objective or other data than the task's: a new stage of the task that
    #: continues its adapter (``run TASK --method dpo --data prefs.jsonl``).
    method: str | None = None
    data: Path | None = None
    skip_invalid: bool = False
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
    #: What the plan changed or decided that the user should know (recorded with the run).
    notes: list[str] = field(default_factory=list)

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

    def objective_lines(self) -> list[str]:
        """The method (and its reference model) and what the run starts from, as the dry run
        shows them."""
        config = self.config
        lines = get_method(config.method).describe(config)
        previous = [
            s["method"] for s in self.task.meta.stages if s.get("status") == TaskStatus.TRAINED
        ]
        adapter = adapter_for(config)
        what = "model" if adapter.standalone else "adapter"
        if config.init_adapter:
            after = f", stage {len(previous) + 1} after {' + '.join(previous)}" if previous else ""
            starts = f"the task's {what} {config.init_adapter}{after}"
        elif adapter.standalone:
            starts = f"{config.model_name} itself"
        else:
            starts = f"a new LoRA adapter on {config.model_name}"
        return [
            lines[0],
            f"Trains: {adapter.describe(config)}",
            f"Starts from: {starts}",
            *lines[1:],
        ]


def resolve_config(task: Task, options: RunOptions) -> TrainingConfig:
    """The config a run of ``task`` trains with (see the module docstring for the order).
    Values given on the command line that do not validate raise UsageProblem."""
    return _resolve(task, options)[0]


def _resolve(task: Task, options: RunOptions) -> tuple[TrainingConfig, list[str]]:
    """The config, and notes on what was changed to make it trainable."""
    recorded = config = task.recorded_config(resume=options.resume)
    if options.preset is not None:
        config = apply_preset(config, options.preset)
    if options.recipe is not None:
        config = config.with_recipe(options.recipe)
    try:
        config = config.with_settings(options.settings)
        config = config.replace(**dict(options.overrides))
        config = _apply_flags(config, options)
        if options.data is not None or config.method != recorded.method:
            config = _new_stage(task, config, options)
        config, notes = get_method(config.method).fit(config)
    except ConfigError as exc:
        raise UsageProblem(str(exc)) from None
    return task.with_task_paths(config), notes


def _new_stage(task: Task, config: TrainingConfig, options: RunOptions) -> TrainingConfig:
    """A run with another method or other data than the task's: a stage that continues the
    task's adapter (a new adapter when the task has none yet)."""
    if options.resume:
        raise ConfigError(
            "resume=True continues the interrupted run as it was: drop method and data."
        )
    changes: dict[str, Any] = {}
    if options.data is not None:
        data = Path(options.data).expanduser()
        if not data.exists():
            raise ConfigError(f"data={options.data}: no such file or directory.")
        changes.update(data_path=str(data.resolve()), eval_data_path=None, data_format=None)
    adapter, merged = task.adapter_dir_for(config), task.merged_dir
    if not is_complete_adapter(adapter) and merged is not None and merged.is_dir():
        raise TaskError(
            f"Task {task.name!r} has a merged model ({merged}) but no adapter to continue: "
            "train a task of its own on the merged model, `sage finetune quickstart "
            f"preference --data FILE --model {merged}`."
        )
    changes["init_adapter"] = str(adapter) if is_complete_adapter(adapter) else None
    return config.replace(**changes)


def _apply_flags(config: TrainingConfig, options: RunOptions) -> TrainingConfig:
    """The named options (``flags``, and the same as Python keywords) and ``quant``."""
    values = dict(options.flags)
    for key, flag in flags("run"):
        if flag.keyword is not None and getattr(options, flag.keyword, None) is not None:
            values[key] = getattr(options, flag.keyword)
    if options.quant is not None:
        if options.quant not in QUANTIZATION:
            raise ConfigError(f"quant must be one of {', '.join(QUANTIZATION)}.")
        values.update(QUANTIZATION[options.quant])
    return apply_flags(config, values)


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
    config, notes = _resolve(task, options)
    hardware = hardware or Hardware.detect()
    runtime = resolve_runtime(config, hardware)
    blockers = get_method(config.method).blockers(config) + adapter_for(config).blockers(config)
    blockers.extend(tracker_blockers(config))  # wandb or mlflow not installed
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
        smaller = (
            "use finetuning_type=lora (or freeze with fewer freeze_trainable_layers)"
            if adapter_for(config).standalone
            else "use quant=4bit"
        )
        blockers.append(
            TrainingError(
                f"Predicted not to fit: {plan.memory_verdict()}. Lower "
                f"per_device_train_batch_size or max_length, {smaller}, pick a smaller "
                "preset (or auto), or pass force=True to try anyway."
            )
        )

    latest = task.latest_checkpoint()
    if options.resume:
        plan.resume_from = latest
    elif latest is not None and task.meta.status in UNFINISHED and not options.force:
        blockers.append(
            TrainingError(
                f"Training of {task.path} stopped at {latest.name} ({task.meta.status}): "
                "continue with resume=True, or start over with force=True."
            )
        )
    else:
        plan.stale_checkpoints = len(task.checkpoints())
    plan.blockers = blockers
    plan.notes = notes
    if options.launch.distributed:
        plan.launch_command = launch_command(
            task.path.resolve(),
            options.launch,
            launch_config_path(task.path.resolve()),
            resume=options.resume,
        )
    return plan


def needs_bitsandbytes(config: TrainingConfig, runtime: Runtime) -> bool:
    """Whether a run may import bitsandbytes: quantized weights, an optimizer other than
    torch's own, or a method whose trainer imports it (TRL's)."""
    return (
        runtime.quantization is not None
        or runtime.optim not in TORCH_OPTIMIZERS
        or get_method(config.method).needs_bitsandbytes
    )


def _train(
    task: Task | str | os.PathLike[str],
    config: TrainingConfig,
    runtime: Runtime,
    resume: bool,
    progress: ProgressSink | None = None,
    **kwargs: Any,
) -> TrainResult:
    """Train ``config`` in this process: bitsandbytes kept out of it while the run does not use
    it (peft imports it when it is installed, and it compiles its CPU kernels as it loads:
    about 2 s before the first step), its logging quieted when it does."""
    from .books import RunBooks
    from .deps import quiet_bitsandbytes, without_bitsandbytes

    quiet_bitsandbytes()
    books = RunBooks(task if isinstance(task, Task) else Path(task), forward=progress)
    needed = needs_bitsandbytes(config, runtime)
    with contextlib.nullcontext() if needed else without_bitsandbytes():
        from .training.recipe import LoRATrainer  # peft, which imports bitsandbytes if it can

        trainer = LoRATrainer(config, task_dir=task, books=books, **kwargs)
        return trainer.train(resume_from_checkpoint=resume)


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
    return _train(
        task,
        plan.config,
        plan.runtime,
        options.resume,
        callbacks=callbacks,
        progress=progress,
        hardware=plan.hardware,
        notes=plan.notes,
    )


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
    config = TrainingConfig.load(config_file)
    return _train(task_dir, config, resolve_runtime(config), resume, progress=progress)


def inspect_data(plan: RunPlan) -> DataStats:
    """Render the planned run's data without caching it, for the statistics (dry run)."""
    return _prepared(plan).stats


def rehearse(plan: RunPlan) -> tuple[DataStats, list[str]]:
    """The dry run's look at the data (its statistics) and the method's check on its first
    samples (``Method.rehearse``: GRPO calls its rewards on sampled completions); raises what
    the check finds."""
    prepared = _prepared(plan)
    return prepared.stats, get_method(plan.config.method).rehearse(plan.config, prepared)


def _prepared(plan: RunPlan) -> PreparedDataset:
    from .data import prepare_dataset
    from .models import load_tokenizer

    config = plan.config
    if not config.data_path:
        raise FinetuneError(f"Task {plan.task.path} names no training data (data_path).")
    tokenizer = load_tokenizer(config.model_name, trust_remote_code=config.trust_remote_code)
    return prepare_dataset(config.data_path, tokenizer, config)


def cancel_run(
    task: Task | str | os.PathLike[str],
    *,
    wait: float | None = None,
    status: Status | None = None,
) -> Task:
    """Stop the run of ``task`` as Ctrl-C does (a checkpoint at the end of the current step,
    status interrupted, resumable). With ``wait`` (seconds; 0 or less: no limit) wait until
    the run has let go of the task; ``status`` is told whom we wait for. Returns the task
    with its meta re-read. TaskError if it is not training; TrainingError on a timeout."""
    task = Task.of(task)
    owner = task.request_cancel()
    if wait is None:
        return task
    if status is not None:
        status(
            f"Asked process {owner.get('pid')} on {owner.get('host')} to stop training "
            f"{task.name!r} at the end of its current step; waiting for its checkpoint ..."
        )
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
