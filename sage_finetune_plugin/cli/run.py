"""``sage finetune run``: plan a run of a task, show it (--dry-run) or start it."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Any

import click

from ..config import setting_help, setting_keys
from ..errors import UsageProblem
from ..presets import PresetConfigs
from ..runs import QUANTIZATION, RunOptions, RunPlan
from ..tracking import destinations
from ._common import (
    ProgressBar,
    cli_words,
    command,
    enable_console_logging,
    root_option,
    summary_lines,
    task_argument,
)
from ._settings import given_settings, setting_options


def _complete_settings(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """``--set`` completes the config keys (``lora.r=``)."""
    return [
        click.shell_completion.CompletionItem(f"{key}=", help=setting_help(key))
        for key in setting_keys()
        if key.startswith(incomplete)
    ]


@command("run")
@task_argument
@click.option(
    "--preset",
    type=click.Choice(PresetConfigs.names()),
    default=None,
    help="Use this preset's hyperparameters (the task's model and data are kept); "
    "auto picks the largest that fits this machine.",
)
@click.option(
    "--config",
    "recipe",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE",
    help="Apply a recipe file: YAML or JSON with training config keys (lora nested).",
)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    shell_complete=_complete_settings,
    help="Set any training config key, typed by its field: --set packing=true "
    "--set lora.target_modules=q_proj,v_proj (repeatable).",
)
@setting_options("run")
@click.option(
    "--quant",
    type=click.Choice(list(QUANTIZATION)),
    default=None,
    help="Load the base model in 4-bit (QLoRA), 8-bit, or unquantized.",
)
@click.option("--4bit", "four_bit", is_flag=True, help="Same as --quant 4bit.")
@click.option("--8bit", "eight_bit", is_flag=True, help="Same as --quant 8bit.")
@click.option("--no-quant", is_flag=True, help="Same as --quant none.")
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    metavar="FILE",
    help="Train on this data instead of the task's: a new stage that continues the task's "
    "adapter (preference pairs or KTO records with --method dpo|orpo|kto).",
)
@click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Show the plan: config, device, data statistics, memory estimate, what would stop "
    "the run; train and write nothing.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Train even when predicted not to fit in memory, or start an interrupted task over.",
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=None,
    help="Training processes on this node (one per GPU; CPU: gloo), started with torchrun.",
)
@click.option("--nnodes", type=click.IntRange(min=1), default=1, help="Machines in the run.")
@click.option("--node-rank", type=click.IntRange(min=0), default=0, help="This machine's index.")
@click.option("--master-addr", default=None, help="Address of node 0 (needed with --nnodes > 1).")
@click.option(
    "--master-port",
    type=click.IntRange(min=1, max=65535),
    default=None,
    help="Port on node 0 [default: a free one on a single node, 29500 across nodes].",
)
@click.option(
    "--accelerate-config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Start the processes with `accelerate launch` and this config file "
    "(DeepSpeed ZeRO, FSDP), passed through unchanged.",
)
@root_option
def run_command(
    task: str,
    preset: str | None,
    recipe: Path | None,
    settings: tuple[str, ...],
    quant: str | None,
    four_bit: bool,
    eight_bit: bool,
    no_quant: bool,
    data: Path | None,
    resume: bool,
    dry_run: bool,
    force: bool,
    nproc: int | None,
    nnodes: int,
    node_rank: int,
    master_addr: str | None,
    master_port: int | None,
    accelerate_config: Path | None,
    root: Path | None,
) -> None:
    """Train an adapter for TASK (a task name or directory) from its meta file.

    --finetuning-type full|freeze trains the model's own weights instead (all of them, or the
    last layers) and saves a whole model in TASK/model. The config is the task's recorded
    one, then --preset, --config FILE, each --set KEY=VALUE, then the named options.
    --method dpo|orpo|kto --data FILE adds a preference stage that continues the task's
    adapter (SFT, then DPO); `sage finetune methods` lists the methods. With --nproc N (and
    --nnodes, --accelerate-config) the run is data-parallel over N processes per node; rank 0
    writes the meta, checkpoints and the adapter, and each rank logs to TASK/logs/rank-<r>.log.
    """
    from ..training.launch import LaunchOptions

    options = RunOptions(
        preset=preset,
        recipe=recipe,
        settings=settings,
        flags=given_settings(),
        quant=_quantization(quant, four_bit, eight_bit, no_quant),
        data=data,
        resume=resume,
        force=force,
        launch=LaunchOptions(nproc, nnodes, node_rank, master_addr, master_port, accelerate_config),
    )
    options.launch.validate()
    from ..deps import require

    require()
    from ..runs import plan_run, start_run
    from ..task import Task

    enable_console_logging()
    plan = plan_run(Task.open(task, root), options)
    if dry_run:
        _print_plan(plan)
        return
    bar = ProgressBar()
    try:
        result = start_run(plan, progress=bar)
    finally:
        bar.close()
    if result is None:
        click.echo(f"Node {node_rank} finished; node 0 wrote the meta and the adapter.")
        return
    for line in summary_lines(result, task):
        click.echo(line)


def _quantization(quant: str | None, four_bit: bool, eight_bit: bool, no_quant: bool) -> str | None:
    """``--quant`` and its aliases, which must agree."""
    chosen = {quant} | {
        name for name, flag in (("4bit", four_bit), ("8bit", eight_bit), ("none", no_quant)) if flag
    }
    chosen.discard(None)
    if len(chosen) > 1:
        raise UsageProblem(
            "Choose one quantization: --quant (or one of --4bit, --8bit, --no-quant)."
        )
    return chosen.pop() if chosen else None


def _print_plan(plan: RunPlan) -> None:
    """What a run would do; writes nothing (the tokenized data is not cached)."""
    from ..runs import rehearse

    config, runtime = plan.config, plan.runtime
    click.echo(f"Task: {plan.task.path}")
    click.echo("Config (each setting's meaning after #):")
    values = dataclasses.asdict(config)
    for key in setting_keys():
        owner, _, name = key.rpartition(".")
        value = values[owner][name] if owner else values[key]
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        click.echo(f"  {key}: {shown}  # {setting_help(key)}")
    optim = runtime.optim + (
        f" (configured {config.optim})" if runtime.optim != config.optim else ""
    )
    quantized = f", {runtime.quantization} quantized" if runtime.quantization else ""
    why = f" ({runtime.precision_reason})" if runtime.precision_reason else ""
    click.echo(
        f"Device: {runtime.device}, precision {runtime.dtype_name}{why}{quantized}, "
        f"optimizer {optim}"
    )
    for note in runtime.notes:
        click.echo(f"  note: {note}")
    resumed = plan.task.meta.tracking if plan.options.resume else None
    trackers = destinations(config, plan.task.path, resumed)
    click.echo("Tracking:" if trackers else "Tracking: none")
    for line in trackers:
        click.echo(f"  {line}")
    for line in plan.objective_lines():
        click.echo(line)
    for note in plan.notes:
        click.echo(f"  note: {note}")
    click.echo("Data:")
    stats, checks = rehearse(plan)
    for line in stats.summary().splitlines():
        click.echo(f"  {cli_words(line)}")
    for line in checks:
        click.echo(line)
    click.echo(f"Memory: {plan.memory_verdict()}")
    for line in plan.memory.summary() if plan.memory else []:
        click.echo(f"  {line}")
    if plan.resume_from is not None:
        click.echo(f"Resume: from {plan.resume_from.name}")
    elif plan.options.resume:
        click.echo("Resume: no complete checkpoint, starts at step 0")
    elif plan.stale_checkpoints:
        click.echo(
            f"Start: step 0, removing {plan.stale_checkpoints} checkpoint(s) of an earlier run"
        )
    for blocker in plan.blockers:
        click.echo(f"Would refuse: {cli_words(str(blocker))}")
    if plan.launch_command:
        click.echo(f"Launch: {shlex.join(plan.launch_command)}")
    click.echo("Dry run: nothing trained, nothing written.")
