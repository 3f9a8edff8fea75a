"""``sage finetune serve``: the task's model behind an OpenAI-compatible API."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ServeError
from ._common import command, root_option, status, task_argument


@command("serve")
@task_argument
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0: every interface, reachable from other machines).",
)
@click.option(
    "--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="Port."
)
@click.option(
    "--engine",
    type=click.Choice(["transformers", "vllm"]),
    default="transformers",
    show_default=True,
    help="Serving engine: `transformers serve`, or vLLM (GPU machines, if installed).",
)
@click.option("--quiet", "-q", is_flag=True, help="Do not show the engine's own log lines.")
@root_option
def serve_command(
    task: str, host: str, port: int, engine: str, quiet: bool, root: Path | None
) -> None:
    """Serve the fine-tuned model behind an OpenAI-compatible API until Ctrl-C.

    Starts an existing engine on the merged model (the adapter is merged first if needed) and
    prints the base URL, the model name to send, and curl and Python examples.
    """
    from ..deps import require

    require("torch", "transformers", "peft")  # to merge the adapter when needed
    from ..serve import plan_serve, run_server

    plan = plan_serve(task, root=root, host=host, port=port, engine=engine, status=status)
    status(f"Starting {plan.engine} on {plan.model_dir} ...")

    def ready() -> None:
        click.echo(f"Serving {plan.model_dir} with {plan.engine}. Ctrl-C stops it.")
        click.echo(f"  Base URL:   {plan.base_url}")
        click.echo(f"  Model name: {plan.model_name}")
        click.echo(f"  curl:       {plan.curl_example}")
        click.echo(f"  Python:     {plan.python_example}")

    code = run_server(plan, on_ready=ready, output=None if quiet else status)
    if code != 0:
        raise ServeError(f"The {plan.engine} server stopped with exit code {code}.")
    status("Server stopped.")
