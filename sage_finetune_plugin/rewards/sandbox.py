"""Running a completion's code against its tests, away from the training process.

``run_code(code, tests)`` writes both into a fresh temporary directory and runs them with
``sys.executable -I`` in a child process: its own session (killed whole at the end), a
minimal environment, resource limits set before it starts (CPU seconds, address space, file
size, open files) and a wall-clock timeout. The tests pass when the child exits with status
0 after they ran to their end (code that calls ``os._exit(0)`` early does not pass). Before
the user's code runs, an audit hook refuses network use (``socket.*`` events), starting
processes (``subprocess.Popen``, ``os.system``, ``os.exec*``, ``os.posix_spawn``,
``os.fork``) and opening files for writing outside the temporary directory.

What this does not protect against (docs/rl.md says so too): it is not a security boundary.
The child runs as the same user, can read whatever that user can read, and audit hooks can be
bypassed by determined code (ctypes, a C extension); the limits stop loops, memory blow-ups
and accidents, not an attacker. Run untrusted code's rewards in a container or a VM.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: Default limits of one run: wall seconds, CPU seconds, address space and written bytes.
TIMEOUT_S = 10.0
MEMORY_BYTES = 1 << 30
FILE_BYTES = 16 << 20
OPEN_FILES = 64

#: Installed in the child before the user's code: no network, no processes, no writes outside
#: its directory. ``sys.exit`` and a failed assert end the run with a status, as tests do.
_RUNNER = r"""
import os, sys
_home = os.path.realpath(os.getcwd())
_blocked = ("socket.", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn",
            "os.fork", "os.forkpty", "pty.spawn")
def _guard(event, args):
    if event.startswith(_blocked):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and len(args) > 1 and args[1] and any(m in str(args[1]) for m in "wax+"):
        path = args[0]
        if isinstance(path, (str, bytes, os.PathLike)):
            real = os.path.realpath(os.fsdecode(path))
            if not real.startswith(_home + os.sep) and real != _home:
                raise PermissionError(f"sandbox: writing {real} is not allowed")
def _main(token):
    source = open("solution.py", encoding="utf-8").read() + "\n\n"
    source += open("tests.py", encoding="utf-8").read()
    exec(compile(source, "solution.py", "exec"), {"__name__": "__main__"})
    sys.stdout.flush()
    os.write(1, token)  # the tests ran to their end (not an early os._exit(0))
_token = sys.argv.pop().encode()
sys.addaudithook(_guard)
del _guard
_main(_token)
"""


@dataclass(frozen=True)
class CodeRun:
    """How a run ended: ``passed`` (status 0), else the status or ``timed_out``, and the
    end of its output."""

    passed: bool
    returncode: int | None
    timed_out: bool
    output: str


def run_code(
    code: str,
    tests: str,
    *,
    timeout: float = TIMEOUT_S,
    memory: int = MEMORY_BYTES,
) -> CodeRun:
    """Run ``code`` then ``tests`` in a child process with the limits above."""
    with tempfile.TemporaryDirectory(prefix="sage-reward-") as folder:
        home = Path(folder)
        (home / "solution.py").write_text(code, encoding="utf-8")
        (home / "tests.py").write_text(tests, encoding="utf-8")
        (home / "runner.py").write_text(_RUNNER, encoding="utf-8")
        env = {"PATH": os.defpath, "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8"}
        token = f"\n<sage-tests-ran:{secrets.token_hex(16)}>"
        process = subprocess.Popen(
            [sys.executable, "-I", "runner.py", token],
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_limits(timeout, memory),
        )
        try:
            output, _ = process.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            output = b""
        finally:
            _kill_group(process)
        text = output.decode("utf-8", "replace")
        ran = text.endswith(token)
        status = None if timed_out else process.returncode
        return CodeRun(status == 0 and ran, status, timed_out, text.removesuffix(token)[-2000:])


def _limits(timeout: float, memory: int) -> Callable[[], None]:
    def apply() -> None:
        import resource

        cpu = max(1, int(timeout) + 1)
        for limit, value in (
            (resource.RLIMIT_CPU, cpu),
            (resource.RLIMIT_AS, memory),
            (resource.RLIMIT_FSIZE, FILE_BYTES),
            (resource.RLIMIT_NOFILE, OPEN_FILES),
            (resource.RLIMIT_CORE, 0),
        ):
            resource.setrlimit(limit, (value, value))

    return apply


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """End the child and anything it left in its session."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)
    if process.stdout is not None:
        process.stdout.close()
