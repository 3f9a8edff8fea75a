"""The task lifecycle: ``list`` (with a running task's progress), ``cancel`` and ``delete``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..meta import TaskStatus
from ..paths import HOME_ENV, task_root
from ._common import command, fmt, root_option, status, task_argument

COLUMNS = [
    ("NAME", "name"),
    ("STATUS", "status"),
    ("MODEL", "model"),
    ("FORMAT", "format"),
    ("SAMPLES", "samples"),
    ("STEPS", "steps"),
    ("LOSS", "train_loss"),
    ("EVAL", "eval"),
    ("REWARD", "reward"),
    ("TOK/S", "tokens_per_second"),
    ("KIND", "kind"),
    ("ADAPTER", "adapter"),
    ("MERGED", "merged"),
    ("UPDATED", "updated"),
    ("TRACKER", "tracker"),
]


@command("list")
@root_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def list_command(root: Path | None, as_json: bool) -> None:
    """List every task under the root with its status, metrics, live progress and tracker runs."""
    from ..task import scan_tasks

    base = task_root(root)
    rows = [entry.summary() for entry in scan_tasks(base)]
    if as_json:
        click.echo(json.dumps({"root": str(base), "tasks": rows}, indent=2))
        return
    if not rows:
        click.echo(
            f"No tasks under {base}. Create one with `sage finetune quickstart code` "
            f"(or point --root / ${HOME_ENV} elsewhere)."
        )
        return
    table = [[title for title, _ in COLUMNS]]
    for row in rows:
        if row["status"] == "broken":
            table.append([row["name"], "broken", *["-"] * (len(COLUMNS) - 2)])
        else:
            table.append([_cell(key, row) for _, key in COLUMNS])
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    for line in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    for row in rows:
        if row["status"] == "broken":
            click.echo(f"broken: {row['error']}", err=True)


def _cell(key: str, row: dict[str, Any]) -> str:
    """A table cell: a running task shows step/max steps; one marked as training that no
    process holds any more is shown as crashed (continue it with run --resume)."""
    if key == "status" and row["status"] == TaskStatus.TRAINING and not row["running"]:
        return "crashed"
    if key == "steps" and row["running"] and row["steps"] is not None:
        return f"{row['steps']}/{fmt(row['max_steps'])}"
    if key == "eval" and row[key]:
        return _eval_cell(row[key])
    if key == "reward" and row.get(key) is not None:
        per = ", ".join(f"{name} {value:.2f}" for name, value in (row["rewards"] or {}).items())
        return f"{row[key]:.2f}" + (f" ({per})" if per else "")
    if key == "tokens_per_second" and row[key] is not None:
        return f"{row[key]:.0f}"
    return fmt(row[key])


def _eval_cell(headline: dict[str, Any]) -> str:
    """The tuned model's ROUGE-L and its change from the base: ``0.83 (+0.71)``."""
    tuned, base = headline.get("tuned"), headline.get("base")
    if tuned is None:
        return "-" if base is None else f"base {base:.2f}"
    return f"{tuned:.2f}" + ("" if base is None else f" ({tuned - base:+.2f})")


@command("cancel")
@task_argument
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Wait until the run has saved its checkpoint and stopped.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=0,
    show_default=True,
    help="Seconds to wait at most (0: as long as the current step takes).",
)
@root_option
def cancel_command(task: str, wait: bool, timeout: float, root: Path | None) -> None:
    """Stop the training of TASK from another terminal, as Ctrl-C does.

    The run saves a checkpoint at the end of its current step and is marked interrupted;
    continue it later with `run TASK --resume`.
    """
    from ..runs import cancel_run
    from ..task import Task

    handle = cancel_run(Task.open(task, root), wait=timeout if wait else None, status=status)
    if not wait:
        click.echo(f"Asked the run of {task!r} to stop at the end of its current step.")
        return
    meta = handle.meta
    checkpoint = handle.latest_checkpoint()
    saved = f", {checkpoint.name} saved" if checkpoint else ""
    click.echo(
        f"Stopped {task!r} at step {meta.metrics.get('global_step', '?')} (status "
        f"{meta.status}{saved}). Continue with: sage finetune run {task} --resume"
    )


@command("delete")
@task_argument
@click.option(
    "--force",
    is_flag=True,
    help="Also delete a task marked as training that no live process holds (a crashed run) "
    "or that is locked from another machine.",
)
@root_option
def delete_command(task: str, force: bool, root: Path | None) -> None:
    """Delete TASK: its data, checkpoints, adapter and merged model. Refused while it trains."""
    from ..task import delete_task

    path = delete_task(task, root=root, force=force)
    click.echo(f"Deleted task {path.name!r} ({path}).")
