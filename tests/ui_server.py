"""A real `sage finetune ui` server in a subprocess on a free loopback port, and a small HTTP
client for it (urllib: what a script without extra packages would use)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from conftest import BIN


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class UiServer:
    """``sage-finetune ui --root ROOT --port P ...`` until ``stop``."""

    def __init__(self, root: Path, *args: str, host: str = "127.0.0.1") -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.token: str | None = None
        self.log = root.parent / f"ui-server-{self.port}.log"
        with self.log.open("w") as output:
            self.process = subprocess.Popen(
                [str(BIN / "sage-finetune"), "ui", "--root", str(root), "--host", host,
                 "--port", str(self.port), *args],
                stdout=output,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
        deadline = time.monotonic() + 120
        while "Ctrl-C stops it" not in self.output():
            assert self.process.poll() is None, f"the server exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"the server did not start:\n{self.output()}"
            time.sleep(0.2)

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def request(
        self, method: str, path: str, body: Any = None, *, raw: bytes | None = None
    ) -> tuple[int, Any]:
        """(HTTP status, decoded JSON) of a request to ``/api/v1{path}``."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(
            f"{self.base}/api/v1{path}", data=data, method=method, headers=headers
        )
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with direct.open(request, timeout=120) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def ok(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        status, data = self.request(method, path, body, **kwargs)
        assert 200 <= status < 300, (status, data, self.output()[-3000:])
        return data

    def wait_for(self, name: str, condition: Any, what: str, timeout: float = 300) -> dict:
        """Poll the task's progress until ``condition(row)`` holds (generous deadline)."""
        deadline = time.monotonic() + timeout
        row: dict = {}
        while time.monotonic() < deadline:
            row = self.ok("GET", f"/tasks/{name}/progress")["task"]
            if condition(row):
                return row
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}: {row}\n{self.output()[-3000:]}")

    def wait_for_job(self, name: str, kind: str, timeout: float = 300) -> dict:
        row = self.wait_for(
            name,
            lambda r: r["job"] and r["job"]["kind"] == kind and r["job"]["state"] != "running",
            f"the {kind} job",
            timeout,
        )
        return row

    def stop(self, sig: int = signal.SIGINT, timeout: float = 300) -> int:
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
