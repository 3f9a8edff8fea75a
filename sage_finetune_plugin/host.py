"""Plug the ``finetune`` command group into a ``sage`` host. Never raises.

Two hosts load the ``sage.cli.plugins`` entry point and call ``register`` with one argument:

* ``isage`` >= 0.3: an argparse sub-parsers action. The host runs ``parse_known_args`` and then
  ``args._handler(args)``, whose return value becomes the exit code. An exception raised here
  would break every ``sage`` command, so everything is caught.
* ``isage-cli`` 0.2.x: a Typer app. Typer >= 0.26 vendors its own Click, so the Click group
  cannot be attached with ``add_typer``; a pass-through command forwards the arguments.

Either way every argument after ``finetune`` reaches the Click group unchanged (leading
``--help``, options before positionals, ``--``), and the Click exit code is the host's.
This module imports nothing heavy; the Click group is imported only when ``finetune`` runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

COMMAND = "finetune"
HELP = (
    "Fine-tune small language models with LoRA / QLoRA (quickstart, run, list, cancel, "
    "delete, merge, chat, eval, export, serve, ui, methods, doctor)."
)


def run_group(argv: Sequence[str]) -> int:
    """Run the Click group with ``argv`` as ``sage finetune``; return its exit code."""
    try:
        from .cli import finetune
    except Exception as exc:  # a broken install: explain instead of failing the host
        print(
            f"sage finetune is unavailable: {type(exc).__name__}: {exc}. "
            "Reinstall it with `pip install --force-reinstall sage-finetune-plugin`.",
            file=sys.stderr,
        )
        return 1
    try:
        finetune.main(args=list(argv), prog_name=f"sage {COMMAND}", standalone_mode=True)
    except SystemExit as exc:
        return _exit_code(exc.code)
    return 0


def _exit_code(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _register_argparse(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        COMMAND,
        help=HELP,
        description=HELP,
        add_help=False,  # --help belongs to the Click group
        # With no usable prefix character nothing looks like an option to argparse, so
        # REMAINDER keeps every token as typed: a leading --help, options, and "--".
        prefix_chars="\0",
    )
    parser.add_argument("finetune_args", nargs=argparse.REMAINDER)

    def handler(args: argparse.Namespace) -> int:
        return run_group(args.finetune_args)

    parser.set_defaults(_handler=handler)


def _register_typer(app: Any) -> None:
    def finetune_passthrough(ctx: Any) -> None:  # ctx: typer.Context (Typer's own Click)
        code = run_group(list(ctx.args))
        if code:
            raise SystemExit(code)

    # Typer reads the annotation to inject the context; use the host's own Context class.
    import typer

    finetune_passthrough.__annotations__ = {"ctx": typer.Context, "return": None}
    app.command(
        COMMAND,
        help=HELP,
        add_help_option=False,
        context_settings={
            "allow_extra_args": True,
            "ignore_unknown_options": True,
            "help_option_names": [],
        },
    )(finetune_passthrough)


def register(host: Any) -> None:
    """Entry point of the ``sage.cli.plugins`` group: add ``finetune`` to ``host``."""
    try:
        if hasattr(host, "add_parser"):
            _register_argparse(host)
        elif hasattr(host, "registered_commands") and hasattr(host, "command"):
            _register_typer(host)
        else:
            print(
                f"sage-finetune-plugin: unknown sage host object {type(host).__name__}; "
                "`finetune` is not registered. Use the standalone `sage-finetune` command.",
                file=sys.stderr,
            )
    except Exception as exc:  # never break the host's other commands
        print(
            f"sage-finetune-plugin: could not register `finetune` ({type(exc).__name__}: {exc}). "
            "Use the standalone `sage-finetune` command.",
            file=sys.stderr,
        )
