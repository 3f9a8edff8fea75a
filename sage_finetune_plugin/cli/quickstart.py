"""``sage finetune quickstart``: a task (data, config, meta) ready for ``run``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..presets import PresetConfigs
from ..quickstart import TASK_TYPES
from ._common import command, root_option, status
from ._settings import given_settings, setting_options
from .run import run_command

_TYPES = "\n".join(
    f"      {name:<12} {kind.description} (method {kind.method})"
    for name, kind in TASK_TYPES.items()
)


@command(
    "quickstart",
    help=f"""Create a task (data + config + meta) ready for `run`.

    \b
    TASK_TYPE is one of:
{_TYPES}

    code builds its data from --source; the others read --data. Records of a kind the task's
    method does not train on (preference pairs for sft, instructions for dpo) and multimodal
    records are refused, saying what to use instead; `sage finetune methods` lists the
    methods and the data each reads.
    """,
)
@click.argument("task_type", metavar="TASK_TYPE")
@click.option(
    "--data",
    metavar="SOURCE",
    multiple=True,
    help="Your training data: a .jsonl, .json, .csv, .parquet or .txt file (.txt: one sample "
    "per block of lines separated by a blank line), a folder of such files or one written by "
    "datasets.save_to_disk, a quoted glob ('data/*.jsonl'), or a Hugging Face dataset "
    "ORG/NAME[:SPLIT] from the local datasets cache. Repeat to combine several, in order.",
)
@click.option(
    "--source",
    type=click.Path(file_okay=False, path_type=Path),
    help="Code base for the code task [default: the current directory].",
)
@click.option("--name", help="Task name [default: TASK_TYPE].")
@setting_options("quickstart")
@click.option(
    "--preset",
    type=click.Choice(PresetConfigs.names()),
    default="auto",
    show_default=True,
    help="Hardware preset; auto picks the largest that fits this machine for --model.",
)
@click.option("--force", is_flag=True, help="Replace an existing task of the same name.")
@click.option("--run", "run_after", is_flag=True, help="Start training once the task is ready.")
@click.option(
    "--preview",
    type=click.IntRange(min=0),
    default=0,
    metavar="N",
    help="Print N samples as the model sees them, prompt parts marked.",
)
@root_option
def quickstart_command(
    task_type: str,
    data: tuple[str, ...],
    source: Path | None,
    name: str | None,
    preset: str,
    force: bool,
    run_after: bool,
    preview: int,
    root: Path | None,
) -> None:
    from ..deps import require

    require()
    from ..quickstart import QuickstartOptions, quickstart

    options = QuickstartOptions(
        task_type,
        data=list(data) or None,
        source=source,
        name=name,
        preset=preset,
        force=force,
        root=root,
        preview=preview,
        settings=given_settings(),
    )
    result = quickstart(options, status=status)
    _print_quickstart(result)
    if run_after:
        status(f"Training {result.task_dir} ...")
        click.get_current_context().invoke(run_command, task=str(result.task_dir), root=root)
    else:
        click.echo(f"Next: sage finetune run {result.task_dir}")


def _print_quickstart(result: Any) -> None:
    action = "replaced" if result.replaced else "created"
    click.echo(f"Task {result.task_dir.name!r} {action} at {result.task_dir}")
    click.echo(
        f"  model {result.config.model_name}, preset {result.config.preset}, "
        f"format {result.config.data_format}, method {result.config.method}"
    )
    if result.code is not None:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(result.code.skipped.items()))
        click.echo(
            f"  code: {len(result.code.records)} records from {result.code.files_used} files"
            + (f" (skipped {skipped})" if skipped else "")
        )
    if result.stats is not None:
        for line in result.stats.summary().splitlines():
            if line.startswith("warning: "):
                status(f"Warning: {line.removeprefix('warning: ')}")
            else:
                click.echo(f"  {line}")
    else:
        invalid = sum(result.dropped.values())
        click.echo(
            f"  records: {result.records_read} read, {result.records_kept} valid, {invalid} invalid"
        )
        for reason, count in result.dropped.items():
            click.echo(f"  invalid {count}: {reason}")
    for note in result.notes:
        status(f"  note: {note}")
    for warning in result.warnings:
        status(f"Warning: {warning}")
    if result.preview:
        click.echo("\nPreview ([[...]] is prompt: no loss; the rest is what the model learns):")
    for number, sample in enumerate(result.preview, 1):
        click.echo(f"--- sample {number} ---")
        text = "".join(
            piece if trainable else click.style(f"[[{piece}]]", dim=True)
            for piece, trainable in sample
        )
        click.echo(text)
