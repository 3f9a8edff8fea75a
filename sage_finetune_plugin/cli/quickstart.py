"""``sage finetune quickstart``: a task (data, config, meta) ready for ``run``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..presets import PresetConfigs
from ._common import command, root_option, status
from .run import run_command


@command("quickstart")
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
@click.option(
    "--format",
    "data_format",
    callback=lambda _ctx, _param, value: _data_format(value),
    help="Force the data format: alpaca, qa, conversation, prompt_completion or text.",
)
@click.option(
    "--columns",
    metavar="FIELD=COLUMN,...",
    callback=lambda _ctx, _param, value: _mapping(value, "--columns"),
    help="Read fields stored under other names, e.g. output=response,instruction=prompt "
    "(role=KEY,content=KEY: the keys inside conversation turns).",
)
@click.option(
    "--replace",
    "replacements",
    metavar="KEY=VALUE",
    multiple=True,
    help="Fill {{KEY}} placeholders in the data with VALUE (repeatable).",
)
@click.option(
    "--system",
    "system_prompt",
    metavar="TEXT",
    help="Default system prompt for records without one; `chat` uses it for this task too.",
)
@click.option(
    "--max-length",
    type=click.IntRange(min=2),
    metavar="N",
    help="Longest sample in tokens [default: the preset's].",
)
@click.option(
    "--skip-invalid",
    is_flag=True,
    help="Drop malformed records instead of failing (never preference, KTO or media records).",
)
@click.option(
    "--method",
    type=click.Choice(["dpo", "orpo", "kto"]),
    default=None,
    help="For `quickstart preference`: the method the task trains [default: dpo].",
)
@click.option("--model", help="Base model: hub id or local directory [default: the preset's].")
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
    data_format: str | None,
    columns: dict[str, str] | None,
    replacements: tuple[str, ...],
    system_prompt: str | None,
    max_length: int | None,
    skip_invalid: bool,
    method: str | None,
    model: str | None,
    preset: str,
    force: bool,
    run_after: bool,
    preview: int,
    root: Path | None,
) -> None:
    """Create a task (data + config + meta) ready for `run`.

    \b
    TASK_TYPE is one of:
      code         questions and answers derived from a Python code base (--source)
      qa           question/answer records from --data
      instruction  alpaca instruction/input/output records from --data
      chat         conversations (messages or ShareGPT) from --data
      custom       any supported format from --data, detected
      preference   chosen/rejected pairs or KTO records from --data, for --method
                   dpo (default), orpo or kto (needs TRL)

    The supervised types refuse preference pairs, KTO labels and multimodal records, saying
    what to use instead.
    """
    from ..deps import require

    require()
    from ..quickstart import quickstart

    if task_type == "code":
        scanned = (source or Path.cwd()).expanduser().resolve()
        status(f"Scanning Python files under {scanned}")
    placeholders = _replacements(replacements)
    result = quickstart(
        task_type,
        data=list(data) or None,
        source=source,
        name=name,
        data_format=data_format,
        columns=columns,
        placeholders=placeholders,
        system_prompt=system_prompt,
        max_length=max_length,
        skip_invalid=skip_invalid,
        model=model,
        preset=preset,
        force=force,
        root=root,
        preview=preview,
        on_status=status,
        method=method,
    )
    _print_quickstart(result)
    if run_after:
        status(f"Training {result.task_dir} ...")
        click.get_current_context().invoke(run_command, task=str(result.task_dir), root=root)
    else:
        click.echo(f"Next: sage finetune run {result.task_dir}")


def _data_format(value: str | None) -> str | None:
    from ..data import resolve_format
    from ..errors import ConfigError

    try:
        return resolve_format(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


def _mapping(value: str | None, option: str) -> dict[str, str] | None:
    from ..config import parse_mapping
    from ..errors import ConfigError

    if not value:
        return None
    try:
        return parse_mapping(value, option)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


def _replacements(items: tuple[str, ...]) -> dict[str, str] | None:
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"takes KEY=VALUE, got {item!r}.", param_hint="--replace")
        values[key.strip()] = value
    return values or None


def _print_quickstart(result: Any) -> None:
    action = "replaced" if result.replaced else "created"
    click.echo(f"Task {result.task_dir.name!r} {action} at {result.task_dir}")
    click.echo(
        f"  model {result.config.model_name}, preset {result.config.preset}, "
        f"format {result.config.data_format}"
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
