"""What every command shares: error reporting, the --root option, task-name completion, the
console logging, the progress bar and small formatting helpers."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from ..errors import FinetuneError, UsageProblem
from ..paths import HOME_ENV, META_FILENAME, task_root


class FinetuneCommand(click.Command):
    """A command that reports FinetuneError as one line instead of a traceback: exit 1 (or the
    error's own code, such as 130 for an interrupted run), exit 2 for usage problems."""

    def invoke(self, ctx: click.Context) -> Any:
        # bitsandbytes warns at import time that an optional CPU kernel package is missing.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        try:
            return super().invoke(ctx)
        except UsageProblem as exc:
            raise click.UsageError(str(exc), ctx=ctx) from None
        except FinetuneError as exc:
            error = click.ClickException(str(exc))
            error.exit_code = exc.exit_code
            raise error from None


def command(name: str, **kwargs: Any) -> Any:
    """``@click.command`` with this plugin's error reporting."""
    return click.command(name, cls=FinetuneCommand, **kwargs)


def _complete_tasks(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Task names under the root (``--root`` if already typed), for shell completion."""
    root = task_root(ctx.params.get("root"))
    try:
        names = sorted(
            child.name
            for child in root.iterdir()
            if (child / META_FILENAME).is_file() and child.name.startswith(incomplete)
        )
    except OSError:
        return []
    return [click.shell_completion.CompletionItem(name) for name in names]


root_option = click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    is_eager=True,  # parsed first, so task-name completion can look under it
    help=f"Directory that holds tasks [default: ${HOME_ENV} or ./finetune_output].",
)
task_argument = click.argument("task", shell_complete=_complete_tasks)


def status(message: str) -> None:
    """Progress and status lines go to stderr, so stdout holds only results."""
    click.echo(message, err=True)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def human_size(num_bytes: int) -> str:
    size = float(num_bytes)
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def enable_console_logging(level: int = logging.INFO) -> None:
    """Show this package's log records (model, LoRA targets, notes) on stderr."""
    package = logging.getLogger(__package__.rpartition(".")[0])
    if not any(getattr(h, "_sage_console", False) for h in package.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._sage_console = True  # type: ignore[attr-defined]
        package.addHandler(handler)
    package.setLevel(level)
    # bitsandbytes warns at import that an optional CPU kernel package is missing.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


class ProgressBar:
    """Draws a run's progress reports (``training.callbacks.RunProgress``) as a tqdm bar on
    stderr with the last loss, the learning rate and tokens/s, plus one line per logging
    step so the loss curve stays readable in the terminal."""

    def __init__(self, file: Any = None) -> None:
        self.file = file
        self.bar: Any = None

    def __call__(self, progress: Any) -> None:
        if progress.event == "start":
            from tqdm.auto import tqdm

            self.close()
            self.bar = tqdm(
                total=progress.max_steps,
                initial=progress.step,
                unit="step",
                desc="training",
                dynamic_ncols=True,
                file=self.file or sys.stderr,
            )
        elif self.bar is None:
            return
        elif progress.event == "step":
            self.bar.update(progress.step - self.bar.n)
            postfix = {"tok/s": f"{progress.tokens_per_second:.0f}"}
            if progress.loss is not None:
                postfix["loss"] = f"{progress.loss:.4f}"
            if progress.learning_rate is not None:
                postfix["lr"] = f"{progress.learning_rate:.2e}"
            self.bar.set_postfix(postfix, refresh=False)
        elif progress.event == "log":
            self.bar.write(progress.line(), file=self.bar.fp)
        elif progress.event == "end":
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def summary_lines(result: Any, task_ref: str) -> list[str]:
    """What a finished run reports: steps, loss, speed, time, adapter and what to do next."""
    m = result.metrics
    loss = "-" if m.get("train_loss") is None else f"{m['train_loss']:.4f}"
    processes = m.get("world_size") or 1
    batch = m.get("effective_batch_size")
    scale = f" on {processes} processes" if processes > 1 else ""
    lines = [
        f"Trained {m.get('global_step')} steps ({m.get('epochs')} epochs) in "
        f"{m.get('wall_time_s', 0):.0f} s{scale}: final loss {loss}, "
        f"{m.get('tokens_per_second') or 0:.0f} tokens/s"
        + (f", effective batch {batch}." if batch else "."),
    ]
    if m.get("reward_margin") is not None:  # preference tuning
        rewards = [f"margin {m['reward_margin']:.3f}"]
        if m.get("reward_accuracy") is not None:
            rewards.append(f"accuracy {m['reward_accuracy']:.2f}")
        if m.get("eval_reward_margin") is not None:
            rewards.append(f"eval margin {m['eval_reward_margin']:.3f}")
        if m.get("eval_reward_accuracy") is not None:
            rewards.append(f"eval accuracy {m['eval_reward_accuracy']:.2f}")
        lines.append(f"Rewards ({m.get('method')}): {', '.join(rewards)}.")
    return [
        *lines,
        f"Adapter: {result.adapter_path}",
        f"Next: sage finetune chat {task_ref}    |    sage finetune merge {task_ref}",
    ]
