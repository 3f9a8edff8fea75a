"""Run the web UI: check the address, the port and the token rule, then serve with Uvicorn.

``plan_ui`` checks what can be checked before starting (FastAPI and Uvicorn installed, the port
free) and applies the safety rule: on a loopback address no token is needed; on any other
address a token is required on every request, the given one or a generated one. ``run_ui``
serves until Ctrl-C, SIGTERM or SIGHUP, and stops the worker processes the server started on
its way out (a run is interrupted at the end of its step, checkpointed and resumable). Nothing
here prints.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..deps import require
from ..errors import UsageProblem
from ..paths import task_root
from ..serve import check_port, termination_as_interrupt

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class UiPlan:
    """A UI server ready to start."""

    root: Path
    host: str
    port: int
    token: str | None
    max_upload: int
    token_generated: bool = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1"
        query = f"?token={self.token}" if self.token else ""
        return f"http://{host}:{self.port}/{query}"


def plan_ui(
    root: str | os.PathLike[str] | None = None,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token: str | None = None,
    max_upload_mb: float = 100,
) -> UiPlan:
    """Check the packages and the port; a token for a non-loopback address (generated when
    none is given)."""
    require("fastapi", "uvicorn", extra="ui")
    if not 0 < port < 65536:
        raise UsageProblem(f"port must be between 1 and 65535, got {port}.")
    if max_upload_mb <= 0:
        raise UsageProblem(f"max_upload_mb must be positive, got {max_upload_mb:g}.")
    if token is not None and len(token) < 8:
        raise UsageProblem("token must have at least 8 characters.")
    check_port(host, port)
    generated = token is None and host not in LOOPBACK
    if generated:
        token = secrets.token_urlsafe(24)
    root_dir = task_root(root).expanduser().resolve()
    return UiPlan(root_dir, host, port, token, int(max_upload_mb * 2**20), generated)


def run_ui(plan: UiPlan, *, on_ready: Callable[[], None] | None = None) -> None:
    """Serve until interrupted (Ctrl-C, SIGTERM, SIGHUP); the jobs the server started are
    stopped before it returns."""
    import uvicorn

    from .app import create_app

    app = create_app(plan.root, token=plan.token, max_upload=plan.max_upload, on_ready=on_ready)
    config = uvicorn.Config(
        app,
        host=plan.host,
        port=plan.port,
        log_level="warning",
        timeout_graceful_shutdown=3,  # open event streams are closed after 3 s
    )
    # Uvicorn handles the signals while it serves and raises them again once it has stopped:
    # as KeyboardInterrupt here, which ends the command quietly.
    with termination_as_interrupt(), contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run()
