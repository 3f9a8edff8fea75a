"""The ``finetune`` Click group: parse arguments, call a service, print the result.

Runs as ``sage finetune ...`` (through host.py) and standalone as ``sage-finetune ...``.
Services raise FinetuneError; the group turns that into one line on stderr and exit code 1
(2 for usage problems). Heavy libraries are imported inside the commands that need them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ._version import __version__
from .errors import FinetuneError, UsageProblem
from .paths import HOME_ENV, task_root


class FinetuneGroup(click.Group):
    """A Click group that reports FinetuneError as one line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UsageProblem as exc:
            raise click.UsageError(str(exc), ctx=click.get_current_context(silent=True)) from None
        except FinetuneError as exc:
            error = click.ClickException(str(exc))
            error.exit_code = exc.exit_code
            raise error from None
        except KeyboardInterrupt:
            raise click.Abort() from None


root_option = click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=f"Directory that holds tasks [default: ${HOME_ENV} or ./finetune_output].",
)


@click.group(
    cls=FinetuneGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "--version", prog_name="sage-finetune-plugin")
def finetune() -> None:
    """Fine-tune small language models with LoRA / QLoRA.

    \b
    Workflow:
      quickstart code            build a dataset and a task in ./finetune_output/code
      run finetune_output/code   train a LoRA adapter
      list                       show every task with its status and metrics
      merge code                 merge the adapter into a full-precision model
      chat code                  talk to the fine-tuned model
    """


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


@finetune.command("list")
@root_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def list_command(root: Path | None, as_json: bool) -> None:
    """List every task under the root with its status and metrics."""
    from .meta import scan_tasks

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
    columns = [
        ("NAME", "name"),
        ("STATUS", "status"),
        ("MODEL", "model"),
        ("FORMAT", "format"),
        ("SAMPLES", "samples"),
        ("STEPS", "steps"),
        ("LOSS", "train_loss"),
        ("ADAPTER", "adapter"),
        ("MERGED", "merged"),
        ("UPDATED", "updated"),
    ]
    table = [[title for title, _ in columns]]
    for row in rows:
        if row["status"] == "broken":
            table.append([row["name"], "broken", *["-"] * (len(columns) - 2)])
        else:
            table.append([_fmt(row[key]) for _, key in columns])
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    for row in rows:
        if row["status"] == "broken":
            click.echo(f"broken: {row['error']}", err=True)


# Commands of the data, training and merge/chat layers are added above this line.


def main() -> None:
    """Console script ``sage-finetune``."""
    finetune(prog_name="sage-finetune")


if __name__ == "__main__":
    main()
