"""``sage finetune merge``: the adapter merged into a full-precision copy of the base model."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import command, human_size, root_option, status, task_argument


@command("merge")
@task_argument
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the merged model [default: <task>/merged].",
)
@click.option(
    "--checkpoint",
    default="final",
    show_default=True,
    help="Adapter to merge: final, latest, or a checkpoint step number.",
)
@click.option(
    "--dtype",
    type=click.Choice(["bf16", "fp16", "fp32"]),
    default=None,
    help="Precision of the saved weights [default: the base model's].",
)
@click.option("--force", is_flag=True, help="Replace an existing merged model.")
@root_option
def merge_command(
    task: str,
    output: Path | None,
    checkpoint: str,
    dtype: str | None,
    force: bool,
    root: Path | None,
) -> None:
    """Merge the LoRA adapter into a full-precision copy of the base model.

    A full or freeze task has no adapter: its model folder TASK/model is used as it is."""
    from ..deps import require

    require("torch", "transformers", "peft")
    from ..merge import merge_task

    result = merge_task(
        task,
        root=root,
        output=output,
        checkpoint=checkpoint,
        dtype=dtype,
        force=force,
        status=status,
    )
    click.echo(
        f"Merged the {result.checkpoint} adapter into {result.base_model}: {result.output} "
        f"({result.dtype}, {human_size(result.size_bytes)}; max logit difference to "
        f"base + adapter {result.max_logit_diff:.2g}, tolerance {result.tolerance:.2g})"
    )
