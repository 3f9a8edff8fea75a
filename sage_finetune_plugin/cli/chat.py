"""``sage finetune chat``: talk to a task's model, interactively or one prompt at a time."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from ..errors import FinetuneError, UsageProblem
from ._common import command, root_option, status, task_argument

EXIT_WORDS = ("exit", "quit", "/exit", "/quit")


@command("chat")
@task_argument
@click.option("--prompt", "-p", default=None, help="Answer this message and exit.")
@click.option(
    "--system",
    default=None,
    help="System prompt for the conversation [default: the task's, from quickstart --system; "
    "'' for none].",
)
@click.option("--base", is_flag=True, help="Talk to the base model, without the fine-tune.")
@click.option(
    "--compare", is_flag=True, help="Answer with the base model, then the fine-tuned one."
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Longest answer in tokens.",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="0 answers greedily (reproducible); above 0 samples.",
)
@root_option
def chat_command(
    task: str,
    prompt: str | None,
    system: str | None,
    base: bool,
    compare: bool,
    max_new_tokens: int,
    temperature: float,
    root: Path | None,
) -> None:
    """Talk to the fine-tuned model (the merged one, else base + adapter).

    Type /reset to clear the history; exit, quit or Ctrl-D ends. Reads one message per line
    when the input is a pipe.
    """
    if base and compare:
        raise UsageProblem("--base and --compare cannot be combined.")
    from ..deps import require

    require("torch", "transformers", "peft")
    from ..chat import ChatSession, load_chat_model
    from ..task import Task

    # The fine-tuned model loads first: an untrained task fails before the base model loads.
    wanted = [False, True] if compare else [base]
    handle = Task.open(task, root)
    models = {flag: load_chat_model(handle, base=flag, status=status) for flag in wanted}
    sessions = [
        (
            "base" if flag else "fine-tuned",
            ChatSession(
                models[flag],
                system=system,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
            ),
        )
        for flag in sorted(models, reverse=True)
    ]
    if prompt is not None:
        _answer(sessions, prompt, labelled=compare)
        return
    interactive = sys.stdin.isatty()
    if interactive:
        names = " and ".join(session.description for _, session in sessions)
        status(f"Chatting with {names}. /reset clears the history; exit or Ctrl-D ends.")
    for line in _user_lines(interactive):
        if line.lower() in EXIT_WORDS:
            break
        if line == "/reset":
            for _, session in sessions:
                session.reset()
            status("History cleared.")
        elif line:
            try:
                _answer(sessions, line, labelled=compare)
            except FinetuneError as exc:
                status(f"Error: {exc}")


def _answer(sessions: list[tuple[str, Any]], text: str, *, labelled: bool) -> None:
    """Stream each session's answer to stdout, under its label when comparing."""
    for index, (label, session) in enumerate(sessions):
        if labelled:
            if index:
                click.echo()
            click.echo(f"[{label}]")
        session.generate(text, lambda piece: click.echo(piece, nl=False))
        click.echo()


def _user_lines(interactive: bool) -> Iterator[str]:
    """User messages: prompted on a terminal, one per line from a pipe; ends at EOF."""
    while True:
        if interactive:
            try:
                line = input(">>> ")
            except EOFError:
                click.echo(err=True)
                return
        else:
            line = sys.stdin.readline()
            if not line:
                return
        yield line.strip()
