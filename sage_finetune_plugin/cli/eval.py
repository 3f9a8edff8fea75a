"""``sage finetune eval``: the fine-tuned model against its base, in numbers and side by side."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ._common import ProgressBar, command, root_option, task_argument


@command("eval")
@task_argument
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="Evaluate this file (any format training reads) instead of the task's held-out data.",
)
@click.option(
    "--split",
    type=click.Choice(["eval", "train"]),
    default="eval",
    show_default=True,
    help="Part of the task's data: the held-out part (eval_ratio, or eval_data_path) or the "
    "training part.",
)
@click.option(
    "--max-samples",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Answers generated for at most this many samples (the loss covers all of them).",
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Longest answer in tokens [default: twice the longest reference, 32 to 512].",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Samples per forward pass and per generation batch.",
)
@click.option(
    "--base-only",
    is_flag=True,
    help="Evaluate the base model alone (works before training).",
)
@click.option(
    "--no-base",
    is_flag=True,
    help="Do not evaluate the base model (its cached numbers are still shown).",
)
@click.option(
    "--checkpoint",
    default="final",
    show_default=True,
    help="Tuned model: final (the merged model if any, else the adapter), latest, or a "
    "checkpoint step number.",
)
@click.option("--skip-invalid", is_flag=True, help="Drop malformed records, not stop at the first.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@root_option
def eval_command(
    task: str,
    data: Path | None,
    split: str,
    max_samples: int,
    max_new_tokens: int | None,
    batch_size: int,
    base_only: bool,
    no_base: bool,
    checkpoint: str,
    skip_invalid: bool,
    as_json: bool,
    root: Path | None,
) -> None:
    """Compare the fine-tuned model with its base model on held-out data.

    Loss and perplexity on the answer tokens, and greedy answers scored by exact match,
    token F1 and ROUGE-L (ROUGE-L with the eval extra: pip install
    'sage-finetune-plugin[eval]'). Writes TASK/eval/report.md (with the worst and best examples side
    by side) and TASK/eval/report.json; the base model's numbers are cached, so evaluating
    again after more training only runs the tuned model.
    """
    from ..deps import require

    require("torch", "transformers", "peft", "datasets")
    from ..evaluation import EvalOptions, evaluate_task, metric_rows

    options = EvalOptions(
        data=data,
        split=split,
        max_samples=max_samples,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        base=not no_base,
        tuned=not base_only,
        checkpoint=checkpoint,
        skip_invalid=skip_invalid,
    )
    bar = ProgressBar()
    try:
        report = evaluate_task(task, options, root=root, progress=bar, status=bar.status)
    finally:
        bar.close()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
        return
    click.echo(
        f"{report.task}: {report.measured} of {report.data}; "
        f"{report.generated} answers generated (greedy, at most {report.max_new_tokens} tokens)."
    )
    for name in ("tuned", "base"):
        if name in report.models:
            cached = " (numbers from the cache)" if name == "base" and report.base_cached else ""
            click.echo(f"{name.capitalize()} model: {report.models[name]}{cached}")
    table = [("metric", "base", "tuned", "change"), *metric_rows(report)]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    click.echo()
    for label, *values in table:
        cells = [label.ljust(widths[0])]
        cells += [value.rjust(width) for value, width in zip(values, widths[1:], strict=True)]
        click.echo("  ".join(cells))
    click.echo()
    for note in report.notes:
        click.echo(f"Note: {note}")
    click.echo(f"Report: {report.report_md}")
