"""`serve`: an existing engine (`transformers serve`) behind an OpenAI-compatible API, talked to
with the official `openai` client, stopped with Ctrl-C, no process left."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner
from openai import OpenAI

from sage_finetune_plugin.cli import finetune
from sage_finetune_plugin.errors import ServeError
from sage_finetune_plugin.serve import ServePlan, plan_serve, run_server

from conftest import BIN, QUESTION, run_cli

PROMPTS = (QUESTION, "Hello! Who are you?")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(task: Path, *args: str):
    return CliRunner().invoke(finetune, ["serve", task.name, "--root", str(task.parent), *args])


def chat_answer(task: Path, prompt: str) -> str:
    args = ["chat", task.name, "--root", str(task.parent), "--prompt", prompt]
    result = CliRunner().invoke(finetune, [*args, "--max-new-tokens", "24"])
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def wait_for(path: Path, text: str, process: subprocess.Popen, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        assert process.poll() is None, f"serve exited early: {path.with_suffix('.err').read_text()}"
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not printed within {timeout} s")


def test_openai_client_gets_the_chat_answers_then_ctrl_c_leaves_no_process(
    trained_task: Path, tmp_path: Path
) -> None:
    out, err = tmp_path / "serve.out", tmp_path / "serve.err"
    command = [str(BIN / "sage-finetune"), "serve", "demo", "--root", str(trained_task.parent)]
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            [*command, "--port", str(free_port())], stdout=stdout, stderr=stderr
        )
    try:
        printed = wait_for(out, "Python:", process)
        fields = dict(map(str.strip, line.split(": ", 1)) for line in printed.splitlines()[1:])
        engine = psutil.Process(process.pid).children(recursive=True)
        assert engine, "the engine runs as a child process"
        client = OpenAI(base_url=fields["Base URL"], api_key="unused")
        model = fields["Model name"]
        assert fields["Base URL"].startswith("http://127.0.0.1:")
        assert model == str((trained_task / "merged").resolve())  # merged first
        assert [entry.id for entry in client.models.list().data] == [model]
        answers = []
        for prompt in PROMPTS:
            messages = [{"role": "user", "content": prompt}]
            reply = client.chat.completions.create(
                model=model, messages=messages, temperature=0, max_tokens=24
            )
            stream = client.chat.completions.create(
                model=model, messages=messages, temperature=0, max_tokens=24, stream=True
            )
            streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
            expected = chat_answer(trained_task, prompt)
            assert reply.choices[0].message.content.strip() == expected
            assert streamed.strip() == expected
            answers.append(expected)
        assert answers[1]  # the second prompt gets a real answer, not an empty one
        # SAGE's own OpenAI-compatible client, the `sage chat` command of the host.
        sage = run_cli("sage", "chat", "--backend", "openai", "--base-url", fields["Base URL"],
                       "--model", model, "--ask", QUESTION, check=True)  # fmt: skip
        assert sage.stdout.strip() == answers[0]
    finally:
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        process.wait(timeout=60)

    assert process.returncode == 0, err.read_text()
    assert "Server stopped." in err.read_text()
    assert not psutil.wait_procs(engine, timeout=10)[1]  # nothing left alive


ENGINE = """
import http.server, pathlib, subprocess, sys
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
pathlib.Path(sys.argv[2]).write_text(str(helper.pid))
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
print("engine up", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


@pytest.mark.parametrize("stop", ["ctrl-c", "SIGTERM", "SIGHUP"])
def test_run_server_stops_the_whole_process_group(stop: str, tmp_path: Path) -> None:
    """An engine that starts a helper process and answers /health: once it is ready, Ctrl-C
    (or SIGTERM, SIGHUP to this process) stops both."""
    port, helper_pid = free_port(), tmp_path / "helper.pid"
    command = [sys.executable, "-c", ENGINE, str(port), str(helper_pid)]
    plan = ServePlan("test", command, "127.0.0.1", port, tmp_path, "m")
    lines: list[str] = []

    def ready() -> None:
        if stop == "ctrl-c":
            raise KeyboardInterrupt
        os.kill(os.getpid(), getattr(signal, stop))

    assert run_server(plan, on_ready=ready, output=lines.append, poll_interval=0.1) == 0
    helper = int(helper_pid.read_text())
    assert not psutil.pid_exists(helper) or psutil.Process(helper).status() == "zombie"
    assert lines[0] == "engine up"  # the engine's output reaches the callback
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


def test_engine_that_dies_before_ready_is_one_line(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "import sys; print('boom: no model'); sys.exit(3)"]
    plan = ServePlan("test", command, "127.0.0.1", free_port(), tmp_path, "m")

    with pytest.raises(ServeError, match=r"exited with code 3 before it was ready: boom: no model"):
        run_server(plan, poll_interval=0.1)


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_engine_stops_when_serve_is_killed(tmp_path: Path) -> None:
    """kill -9 of the serving process cannot stop the engine itself: the engine asked the
    kernel for SIGTERM when its parent dies."""
    port, helper_pid = free_port(), tmp_path / "helper.pid"
    serving = (
        "import sys\n"
        "from sage_finetune_plugin.serve import ServePlan, run_server\n"
        "command = [sys.executable, '-c', sys.argv[1], sys.argv[2], sys.argv[3]]\n"
        "plan = ServePlan('test', command, '127.0.0.1', int(sys.argv[2]), '.', 'm')\n"
        "run_server(plan, on_ready=lambda: print('ready', flush=True))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", serving, ENGINE, str(port), str(helper_pid)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "ready"
        engine = psutil.Process(process.pid).children()
        process.kill()
        process.wait(timeout=10)
        assert not psutil.wait_procs(engine, timeout=10)[1]
    finally:
        with contextlib.suppress(ProcessLookupError, ValueError, FileNotFoundError):
            os.kill(int(helper_pid.read_text()), signal.SIGKILL)  # the engine's own child


def test_plan_binds_loopback_and_shows_how_to_call_it(trained_task: Path) -> None:
    port = free_port()
    plan = plan_serve(trained_task, port=port)

    assert plan.command[1:5] == ["-m", "transformers.cli.transformers", "serve", plan.model_name]
    assert plan.command[-4:] == ["--host", "127.0.0.1", "--port", str(port)]
    assert plan.base_url == f"http://127.0.0.1:{port}/v1"
    assert f'"model": "{plan.model_name}"' in plan.curl_example
    assert plan.curl_example.startswith(f"curl {plan.base_url}/chat/completions ")
    compile(plan.python_example, "example", "exec")
    assert plan_serve(trained_task, port=port, host="::1").base_url == f"http://[::1]:{port}/v1"


def test_busy_port_is_refused_before_anything_is_merged(trained_task: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = serve(trained_task, "--port", str(busy.getsockname()[1]))

    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert "is already in use: choose another with --port" in result.output
    assert not (trained_task / "merged").exists()


def test_task_without_a_model_is_one_line(prepared_task: Path) -> None:
    result = serve(prepared_task, "--port", str(free_port()))

    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert "has no trained adapter" in result.output


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_missing_vllm_is_one_line(trained_task: Path) -> None:
    result = serve(trained_task, "--engine", "vllm")

    assert result.exit_code == 1
    assert result.output == (
        "Error: The vllm serving engine is not installed (missing vllm): pip install vllm on a "
        "machine with a CUDA GPU, or use --engine transformers.\n"
    )


def test_missing_web_dependencies_name_the_extra(
    trained_task: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if it were not installed

    result = serve(trained_task)

    assert result.exit_code == 1
    assert "missing fastapi" in result.output
    assert "pip install 'sage-finetune-plugin[serve]'" in result.output
