"""What every command shares: error reporting (in the command line's words), the --root
option, task-name completion, the console logging, the progress bar and small formatting
helpers."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

import click

from ..errors import FinetuneError, UsageProblem
from ..paths import HOME_ENV, META_FILENAME, task_root


class FinetuneCommand(click.Command):
    """A command that reports FinetuneError as one line instead of a traceback, in the
    command line's words (``skip_invalid=True`` becomes ``--skip-invalid``): exit 1 (or the
    error's own code, such as 130 for an interrupted run), exit 2 for usage problems."""

    def invoke(self, ctx: click.Context) -> Any:
        from ..deps import quiet_bitsandbytes

        quiet_bitsandbytes()  # peft imports it, and it warns as it loads
        try:
            return super().invoke(ctx)
        except UsageProblem as exc:
            raise click.UsageError(cli_words(str(exc)), ctx=ctx) from None
        except FinetuneError as exc:
            error = click.ClickException(cli_words(str(exc)))
            error.exit_code = exc.exit_code  # type: ignore[misc]  # click reads it per error
            raise error from None


def command(name: str, **kwargs: Any) -> Any:
    """``@click.command`` with this plugin's error reporting."""
    return click.command(name, cls=FinetuneCommand, **kwargs)


# --- the API's words as the command line's -------------------------------------------------------

#: Parameters of the services that are options of the commands (besides the settings'
#: flags): ``name=VALUE`` -> the option; ``name=True`` -> a flag.
_OPTIONS = {
    "force": "--force",
    "resume": "--resume",
    "data": "--data",
    "source": "--source",
    "quant": "--quant",
    "dtype": "--dtype",
    "output": "--output",
    "max_new_tokens": "--max-new-tokens",
    "checkpoint": "--checkpoint",
    "engine": "--engine",
    "port": "--port",
    "nnodes": "--nnodes",
    "node_rank": "--node-rank",
    "master_addr": "--master-addr",
}
#: Phrases with no ``name=VALUE`` shape.
_PHRASES = {
    "tuned=False": "--base-only",
    "base=False": "--no-base",
    "base=True": "--base",
    "check=False": "--no-check",
}
#: A mapping written as the API takes it: ``columns={'output': 'response'}``.
_MAPPING = re.compile(r"\b(columns|placeholders)=\{([^{}]*)\}")
_PAIR = re.compile(r"['\"]?([^'\":,{}]+?)['\"]?\s*:\s*['\"]?([^'\",{}]*?)['\"]?\s*(?:,|$)")
_TOKEN = re.compile(r"(?<![\w.'\"-])([a-z_][a-z0-9_]*(?:\.[a-z_]+)?)=(?!\{)([^\s,;)]*[^\s,;).])")


def cli_words(message: str) -> str:
    """A service's message with its parameters named as the command line's options:
    ``skip_invalid=True`` -> ``--skip-invalid``, ``max_length=551`` -> ``--max-length 551``,
    a setting without an option -> ``--set eval_ratio=0.1``. Text inside backquotes (a command
    to run) and a quoted ``'name=value'`` (what the user typed) stay as they are."""
    from ..config import setting_fields

    for phrase, option in _PHRASES.items():
        message = message.replace(phrase, option)
    fields = setting_fields()

    def as_option(match: re.Match[str]) -> str:
        name, value = match.group(1), match.group(2)
        flag = fields[name].metadata["flag"] if name in fields else None
        if flag is not None:
            flag_name = f"--{flag.name}"
        elif name in _OPTIONS:
            flag_name = _OPTIONS[name]
        elif name in fields:
            return f"--set {name}={value}"
        else:
            return match.group(0)
        return flag_name if value == "True" else f"{flag_name} {value}"

    pieces = message.split("`")
    pieces[::2] = [_MAPPING.sub(_mapping_option, _TOKEN.sub(as_option, p)) for p in pieces[::2]]
    return "`".join(pieces)


def _mapping_option(match: re.Match[str]) -> str:
    pairs = [f"{key.strip()}={value.strip()}" for key, value in _PAIR.findall(match.group(2))]
    if match.group(1) == "columns":
        return f"--columns {','.join(pairs)}"
    return " ".join(f"--replace {pair}" for pair in pairs)


# --- options and completion ----------------------------------------------------------------------


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


# --- output --------------------------------------------------------------------------------------


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


class _CommandLineFormatter(logging.Formatter):
    """A log record's message in the command line's words (see ``cli_words``)."""

    def format(self, record: logging.LogRecord) -> str:
        return cli_words(super().format(record))


def enable_console_logging(level: int = logging.INFO) -> None:
    """Show this package's log records (model, LoRA targets, notes) on stderr."""
    package = logging.getLogger(__package__.rpartition(".")[0])
    if not any(getattr(h, "_sage_console", False) for h in package.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_CommandLineFormatter("%(message)s"))
        handler._sage_console = True  # type: ignore[attr-defined]
        package.addHandler(handler)
    package.setLevel(level)


class ProgressBar:
    """Draws a service's progress events (``progress.Progress``) as a tqdm bar on stderr, with
    the event's figures beside it; ``log`` events become lines above it (the loss curve stays
    readable in the terminal), and ``status`` writes a text line above it. One bar at a
    time: a ``start`` event replaces the previous one."""

    def __init__(self, file: Any = None) -> None:
        self.file = file or sys.stderr
        self.bar: Any = None

    def __call__(self, progress: Any) -> None:
        if progress.event == "start" or (self.bar is None and progress.event == "step"):
            from tqdm.auto import tqdm

            self.close()
            self.bar = tqdm(
                total=progress.total,
                initial=progress.done if progress.event == "start" else 0,
                unit=progress.unit,
                desc=progress.label,
                dynamic_ncols=True,
                file=self.file,
            )
        if self.bar is None:
            return
        if progress.event == "step":
            self.bar.update(progress.done - self.bar.n)
            self.bar.set_postfix(progress.postfix(), refresh=False)
        elif progress.event == "log":
            self.bar.write(progress.line(), file=self.file)
        elif progress.event == "end":
            self.close()

    def status(self, message: str) -> None:
        """A status line, above the bar when one is drawn."""
        if self.bar is not None:
            self.bar.write(cli_words(message), file=self.file)
        else:
            status(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def status(message: str) -> None:
    """Progress and status lines go to stderr, so stdout holds only results (in the command
    line's words: see ``cli_words``)."""
    click.echo(cli_words(message), err=True)


def summary_lines(result: Any, task_ref: str) -> list[str]:
    """What a finished run reports: steps, loss, speed, time, the method's figures, the
    adapter and what to do next."""
    from ..methods import get_method

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
        *get_method(result.config.method).result_lines(m),
    ]
    return [
        *lines,
        f"Adapter: {result.adapter_path}",
        f"Next: sage finetune chat {task_ref}    |    sage finetune merge {task_ref}",
    ]
