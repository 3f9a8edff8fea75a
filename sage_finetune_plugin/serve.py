"""Serve a task's model behind an OpenAI-compatible API with an existing engine.

``plan_serve`` checks everything that can be checked before starting (the engine is installed,
the port is free, the task has a model: the adapter is merged first when needed) and returns
the engine's command line, the base URL and the model name clients send. ``run_server`` starts
the engine in its own process group, reports when it answers ``/health``, and on Ctrl-C (or
SIGTERM / SIGHUP) stops the whole group, so no process is left behind.

Engines: ``transformers serve`` (the default; needs FastAPI, Uvicorn and the openai package,
the ``serve`` extra), pinned to the one model, which clients name by its folder path; vLLM
(``--engine vllm``, GPU machines), which serves it under the task's name. Nothing here prints.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .deps import installed
from .errors import ServeError, UsageProblem
from .progress import Status
from .task import Task

ENGINES = ("transformers", "vllm")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
#: Import names each engine needs, and how to install them.
ENGINE_MODULES = {
    "transformers": ("transformers.cli.serve", "fastapi", "uvicorn", "pydantic", "openai"),
    "vllm": ("vllm",),
}
ENGINE_INSTALL = {
    "transformers": "pip install 'sage-finetune-plugin[serve]' (FastAPI, Uvicorn, openai)",
    "vllm": "pip install vllm on a machine with a CUDA GPU, or use engine=transformers",
}
#: Seconds a stopped engine gets to exit after SIGINT, then after SIGTERM, before SIGKILL.
STOP_GRACE = (10.0, 5.0)


@dataclass
class ServePlan:
    """An engine ready to start: its command, where it listens, what clients send."""

    engine: str
    command: list[str]
    host: str
    port: int
    model_dir: Path
    model_name: str

    @property
    def base_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}/v1"

    @property
    def health_url(self) -> str:
        """Where readiness is checked: a wildcard address is asked on loopback."""
        local = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://{_url_host(local)}:{self.port}/health"

    @property
    def curl_example(self) -> str:
        body = (
            f'{{"model": "{self.model_name}", "messages": [{{"role": "user", '
            f'"content": "Hello!"}}], "temperature": 0}}'
        )
        return (
            f"curl {self.base_url}/chat/completions -H 'Content-Type: application/json' "
            f"-d {shlex.quote(body)}"
        )

    @property
    def python_example(self) -> str:
        return (
            "from openai import OpenAI; "
            f'client = OpenAI(base_url="{self.base_url}", api_key="unused"); '
            f'print(client.chat.completions.create(model="{self.model_name}", '
            'messages=[{"role": "user", "content": "Hello!"}]).choices[0].message.content)'
        )


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def plan_serve(
    task: Task | str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    engine: str = "transformers",
    status: Status | None = None,
) -> ServePlan:
    """Check the engine, the port and the task's model (merging the adapter first if
    needed) and build the engine's command. Raises ServeError (engine missing, port busy)
    or TaskError (no trained model)."""
    if engine not in ENGINES:
        raise UsageProblem(f"Unknown engine {engine!r}: use one of {', '.join(ENGINES)}.")
    if not 0 < port < 65536:
        raise UsageProblem(f"port must be between 1 and 65535, got {port}.")
    missing = [name for name in ENGINE_MODULES[engine] if not installed(name)]
    if missing:
        raise ServeError(
            f"The {engine} serving engine is not installed (missing {', '.join(missing)}): "
            f"{ENGINE_INSTALL[engine]}."
        )
    check_port(host, port)
    task = Task.of(task, root)

    from .merge import merged_model

    model_dir = merged_model(task, status=status).resolve()
    if engine == "transformers":
        name = str(model_dir)
        command = [
            sys.executable, "-m", "transformers.cli.transformers", "serve", name,
            "--host", host, "--port", str(port),
        ]  # fmt: skip
    else:
        name = task.name
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", name, "--host", host, "--port", str(port),
        ]  # fmt: skip
    if task.trust_remote_code:
        command.append("--trust-remote-code")
    return ServePlan(engine, command, host, port, model_dir, name)


def check_port(host: str, port: int) -> None:
    """ServeError when ``host:port`` cannot be bound (in use, or not an address of this host)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ServeError(f"Cannot listen on {host!r}: {exc.strerror}.") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServeError(
                    f"Port {port} on {host} is already in use: choose another with port=N."
                ) from None
            raise ServeError(f"Cannot listen on {host}:{port}: {exc.strerror}.") from None


# --- running -----------------------------------------------------------------------------------


def run_server(
    plan: ServePlan,
    *,
    on_ready: Callable[[], None] | None = None,
    output: Callable[[str], None] | None = None,
    poll_interval: float = 0.5,
) -> int:
    """Run the engine until it exits or this process is interrupted (Ctrl-C, SIGTERM, SIGHUP);
    then stop the engine's whole process group. ``on_ready`` is called once the engine answers
    ``/health``; ``output`` gets each line the engine writes. Returns 0 when stopped by an
    interruption, else the engine's exit code. Raises ServeError when the engine exits before
    it was ready (its last line says why)."""
    tail: collections.deque[str] = collections.deque(maxlen=20)
    with termination_as_interrupt():
        process = subprocess.Popen(
            _with_parent_death_signal(plan.command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # its own group: a terminal's Ctrl-C reaches only us
        )
        reader = threading.Thread(
            target=_forward, args=(process, tail, output), name="serve-output", daemon=True
        )
        reader.start()
        ready = interrupted = False
        try:
            while process.poll() is None:
                if not ready and _healthy(plan.health_url):
                    ready = True
                    if on_ready is not None:
                        on_ready()
                time.sleep(poll_interval)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            _stop(process)
            reader.join(timeout=5)
    if interrupted:
        return 0
    code = process.returncode
    if not ready:
        said = next((line for line in reversed(tail) if line.strip()), "no output")
        raise ServeError(
            f"The {plan.engine} server exited with code {code} before it was ready: {said.strip()}"
        )
    return code


def _forward(
    process: subprocess.Popen[str],
    tail: collections.deque[str],
    output: Callable[[str], None] | None,
) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        line = line.rstrip("\n")
        tail.append(line)
        if output is not None and line.strip():
            output(line)


def _stop(process: subprocess.Popen[str]) -> None:
    """Stop the engine's group; a second Ctrl-C while it winds down kills it at once."""
    try:
        stop_process_group(process)
    except KeyboardInterrupt:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _healthy(url: str) -> bool:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with direct.open(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def stop_process_group(
    process: subprocess.Popen[str], grace: tuple[float, float] = STOP_GRACE
) -> None:
    """Stop the process and everything in its group: SIGINT (what Ctrl-C sends), then SIGTERM,
    then SIGKILL, each after a grace period; waits until the group is gone."""
    for sig, wait in ((signal.SIGINT, grace[0]), (signal.SIGTERM, grace[1]), (signal.SIGKILL, 5.0)):
        if not _group_alive(process.pid):
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _group_alive(process.pid):
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=0.1)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: Run before the engine (Linux): ask for SIGTERM when this process dies, even by SIGKILL, then
#: become the engine (exec keeps the request). Done in a fresh process, not in a preexec_fn,
#: which is unsafe when this process has threads.
_PARENT_DEATH_LAUNCHER = """
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)  # the parent is gone already
os.execv(sys.argv[2], sys.argv[2:])
"""


def _with_parent_death_signal(command: list[str]) -> list[str]:
    if sys.platform != "linux" or not os.path.isabs(command[0]):
        return command
    return [sys.executable, "-c", _PARENT_DEATH_LAUNCHER, str(os.getpid()), *command]


@contextlib.contextmanager
def termination_as_interrupt() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt while the server runs, so each stops
    it the way Ctrl-C does, also when SIGINT was ignored at start (a background job of a
    script). Only in the main thread, where signal handlers can be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {
        sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
