"""``sage finetune ui``: the tasks in a local web page, and the REST API it uses."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import command, root_option, status


@command("ui")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; any other than loopback requires a token on every request.",
)
@click.option(
    "--port", type=click.IntRange(1, 65535), default=7860, show_default=True, help="Port."
)
@click.option(
    "--token",
    default=None,
    help="Token every request must carry [default: none on loopback, else a generated one].",
)
@click.option(
    "--max-upload-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=100,
    show_default=True,
    help="Largest data file the page or the API accepts.",
)
@root_option
def ui_command(
    host: str, port: int, token: str | None, max_upload_mb: float, root: Path | None
) -> None:
    """Serve a web page and a REST API (/api/v1) over the tasks until Ctrl-C.

    The page lists the tasks live, creates one from a data file, runs, cancels, evaluates,
    merges, exports and deletes them (each the same service as its command), draws the loss
    curve while a run trains, and chats with a tuned model beside its base. Runs it started
    are interrupted (checkpointed, resumable) when the server stops.
    """
    from ..ui.server import plan_ui, run_ui

    plan = plan_ui(root, host=host, port=port, token=token, max_upload_mb=max_upload_mb)

    def ready() -> None:
        base = plan.url.split("?")[0]
        click.echo(f"Serving the tasks under {plan.root}. Ctrl-C stops it.")
        click.echo(f"  Page: {plan.url if plan.token_generated else base}")
        click.echo(f"  API:  {base}api/v1 (OpenAPI at /api/v1/openapi.json)")
        if plan.token_generated:
            click.echo(f"  Token (generated): send `Authorization: Bearer {plan.token}`")
        elif plan.token:
            click.echo("  Token: the one given with --token, on every request")

    run_ui(plan, on_ready=ready)
    status("Server stopped.")
