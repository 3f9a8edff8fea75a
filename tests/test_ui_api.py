"""`sage finetune ui`'s REST API against the real server (a subprocess on a loopback port): a
task created from an uploaded file, a real run on the tiny model watched until it ends, a second
start refused, cancel, eval, delete; the refusals (upload too large, a path outside the root,
unknown task, a token missing); a run interrupted and resumable when the server stops."""

from __future__ import annotations

import json
import re
import signal
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sage_finetune_plugin.meta import load_meta

from conftest import env_without, run_cli, write_data
from ui_server import UiServer

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "root"
    folder.mkdir()
    return folder


@pytest.fixture
def server(root: Path):
    ui = UiServer(root)
    yield ui
    ui.stop()


def create_task(server: UiServer, tmp_path: Path, model: Path, name: str = "demo") -> dict:
    data = write_data(tmp_path / "upload" / "numbers.jsonl")
    stored = server.ok("POST", "/uploads?filename=numbers.jsonl", raw=data.read_bytes())
    assert stored["path"].startswith(".uploads/") and stored["bytes"] == data.stat().st_size
    spec = {"data": stored["path"], "model": str(model), "name": name, "max_length": 64}
    return server.ok("POST", "/tasks", spec)


def test_a_task_from_an_upload_trained_cancelled_evaluated_and_deleted(
    server: UiServer, root: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    created = create_task(server, tmp_path, tiny_model_dir)
    assert created["name"] == "demo" and created["status"] == "prepared"
    assert created["samples"] == 48 and created["format"] == "alpaca"
    (first,) = created["preview"][:1]  # the first sample as the model sees it
    assert [trained for _, trained in first] == [False, True]
    assert not list((root / ".uploads").iterdir())  # the task holds its copy of the data
    listed = server.ok("GET", "/tasks")
    assert [row["name"] for row in listed["tasks"]] == ["demo"]

    task = server.ok("GET", "/tasks/demo")
    assert task["config"]["max_length"] == 64 and task["data_stats"]["records_kept"] == 48
    assert task["data_summary"].startswith("records: 48 read, 48 valid")
    plan = server.ok("GET", "/tasks/demo/plan")
    assert plan["memory"].startswith("fits") and plan["blockers"] == []

    long_run = {"max_steps": 2000, "settings": ["logging_steps=1", "save_steps=100000"]}
    job = server.ok("POST", "/tasks/demo/runs", long_run)
    assert job["kind"] == "run" and job["state"] == "running"
    row = server.wait_for("demo", lambda r: r["running"] and (r["steps"] or 0) >= 3, "3 steps")
    assert row["status"] == "training" and row["max_steps"] == 2000
    assert row["train_loss"] is not None and row["tokens_per_second"] > 0
    assert row["eta_seconds"] is not None

    # A second start while it trains, and a delete, are refused with the one line.
    status, again = server.request("POST", "/tasks/demo/runs", {"max_steps": 5})
    assert status == 409 and again["error"].startswith("Task 'demo' is busy: its run")
    assert "\n" not in again["error"]
    status, refused = server.request("DELETE", "/tasks/demo")
    assert status == 409 and "busy" in refused["error"]

    history = server.ok("GET", "/tasks/demo/progress")["history"]
    assert [h["step"] for h in history if "loss" in h][:3] == [1, 2, 3]
    with urllib.request.urlopen(f"{server.base}/api/v1/tasks/demo/events", timeout=60) as stream:
        line = stream.readline().decode()  # the first server-sent event: the progress now
    assert line.startswith("data: ") and json.loads(line[6:])["task"]["running"]

    server.ok("POST", "/tasks/demo/runs/cancel")
    row = server.wait_for_job("demo", "run")
    assert row["job"]["state"] == "interrupted" and row["status"] == "interrupted"
    stopped = load_meta(root / "demo").metrics["global_step"]
    assert 3 <= stopped < 2000
    assert (root / "demo" / "checkpoints" / f"checkpoint-{stopped}").is_dir()
    status, cancel = server.request("POST", "/tasks/demo/runs/cancel")
    assert status == 409 and "nothing to cancel" in cancel["error"]
    status, fresh = server.request("POST", "/tasks/demo/runs", {"max_steps": 6})
    assert status == 400
    assert "continue with resume=True, or start over with force=True" in fresh["error"]

    server.ok("POST", "/tasks/demo/runs", {"resume": True, "max_steps": stopped + 2})
    row = server.wait_for_job("demo", "run")
    assert row["job"]["state"] == "done", row["job"]
    assert row["status"] == "trained" and row["steps"] == stopped + 2
    logged = [h["step"] for h in server.ok("GET", "/tasks/demo/progress")["history"] if "loss" in h]
    assert logged == list(range(1, stopped + 3))  # the resumed run continued the curve

    server.ok("POST", "/tasks/demo/eval", {"max_samples": 2, "max_new_tokens": 8})
    row = server.wait_for_job("demo", "eval")
    assert row["job"]["state"] == "done", row["job"]
    report = server.ok("GET", "/tasks/demo/eval")
    assert report["tuned"]["loss"] is not None and report["base"]["loss"] is not None
    assert report["examples"] and report["labels"]["rouge_l"] == "ROUGE-L"
    assert server.ok("GET", "/tasks")["tasks"][0]["eval"]["metric"]

    models = [m["id"] for m in server.ok("GET", "/models")["data"]]
    assert models == ["demo", "demo:base"]
    answer = server.ok(
        "POST",
        "/chat/completions",
        {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    )
    assert answer["object"] == "chat.completion"
    assert isinstance(answer["choices"][0]["message"]["content"], str)

    assert server.ok("DELETE", "/tasks/demo")["deleted"] == "demo"
    assert not (root / "demo").exists()
    status, gone = server.request("GET", "/tasks/demo")
    assert status == 404 and gone["error"] == f"Task 'demo' not found under {root.resolve()}."


def test_refusals_upload_size_paths_and_bad_input(root: Path, tmp_path: Path) -> None:
    server = UiServer(root, "--max-upload-mb", "0.001")  # 1 KiB
    try:
        data = write_data(tmp_path / "big.jsonl")  # ~5 KiB
        status, body = server.request("POST", "/uploads?filename=big.jsonl", raw=data.read_bytes())
        assert status == 413 and "larger than the limit" in body["error"]
        chunked = urllib.request.Request(  # no Content-Length: counted as it streams in
            f"{server.base}/api/v1/uploads?filename=big.jsonl",
            data=iter([data.read_bytes()[:512]] * 10),
            method="POST",
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(chunked, timeout=60)
        assert refused.value.code == 413
        assert "larger than the limit" in json.loads(refused.value.read())["error"]
        uploads = root / ".uploads"
        assert not uploads.exists() or not any(uploads.iterdir())  # nothing half-written left

        outside = write_data(tmp_path / "outside.jsonl")
        for path in (str(outside), "../outside.jsonl"):
            status, body = server.request("POST", "/tasks", {"data": path})
            assert status == 403, body
            assert body["error"] == (
                f"data={path} is outside the root {root.resolve()}: put the file under the "
                "root or upload it."
            )
        status, body = server.request("POST", "/uploads?filename=../x.jsonl", raw=b"{}")
        assert status == 400 and "not a plain file name" in body["error"]
        status, body = server.request("POST", "/tasks", {"data": "missing.jsonl"})
        assert status == 400 and "no such file" in body["error"]
        status, body = server.request("POST", "/tasks", {"task_type": "custom"})
        assert status == 422 and body["error"] == "Bad request: data: Field required."
        status, body = server.request("GET", "/tasks/nope/progress")
        assert status == 404 and "not found" in body["error"]
        status, body = server.request("GET", "/tasks/.hidden")
        assert status == 404 and "starts with a dot" in body["error"]
        spec = server.ok("GET", "/openapi.json")
        assert "/api/v1/tasks/{name}/runs" in spec["paths"]
    finally:
        assert server.stop() == 0


def test_another_host_needs_the_token_it_prints(root: Path) -> None:
    server = UiServer(root, host="0.0.0.0")
    try:
        token = re.search(r"Bearer (\S+)`", server.output())
        assert token, server.output()
        status, body = server.request("GET", "/tasks")
        assert status == 401 and "A token is required" in body["error"]
        server.token = token.group(1)
        assert server.ok("GET", "/tasks")["tasks"] == []
        page = f"{server.base}/?token={server.token}"
        with urllib.request.urlopen(page, timeout=30) as response:  # the page, then its cookie
            assert b"sage finetune" in response.read()
            cookie = response.headers["set-cookie"].split(";")[0]
        script = urllib.request.Request(f"{server.base}/static/app.js", headers={"Cookie": cookie})
        with urllib.request.urlopen(script, timeout=30) as response:
            assert response.status == 200
    finally:
        server.stop()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stopping_the_server_interrupts_its_run_resumably(
    root: Path, tmp_path: Path, tiny_model_dir: Path, sig: int
) -> None:
    server = UiServer(root)
    try:
        create_task(server, tmp_path, tiny_model_dir)
        server.ok("POST", "/tasks/demo/runs", {"max_steps": 5000, "settings": ["logging_steps=1"]})
        server.wait_for("demo", lambda r: r["running"] and (r["steps"] or 0) >= 3, "3 steps")
    finally:
        code = server.stop(sig)
    assert code == 0, server.output()
    assert "Server stopped." in server.output()
    meta = load_meta(root / "demo")
    stopped = meta.metrics["global_step"]
    assert meta.status == "interrupted" and 3 <= stopped < 5000, meta.status
    assert (root / "demo" / "checkpoints" / f"checkpoint-{stopped}").is_dir()
    assert not (root / "demo" / ".lock").exists()


def test_without_fastapi_the_command_names_the_ui_extra(tmp_path: Path) -> None:
    proc = run_cli(
        "sage-finetune", "ui", "--root", str(tmp_path), env=env_without(tmp_path, "fastapi")
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "Error: Missing package(s): fastapi. Install them with "
        "`pip install 'sage-finetune-plugin[ui]'`."
    )


def test_the_page_ships_in_the_wheel() -> None:
    """Every file of the page matches the package data of pyproject.toml."""
    import fnmatch
    import tomllib

    repo = Path(__file__).resolve().parent.parent
    config = tomllib.loads((repo / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["sage_finetune_plugin.ui"]
    package = repo / "sage_finetune_plugin" / "ui"
    files = [p.relative_to(package).as_posix() for p in (package / "static").iterdir()]
    assert sorted(files) == ["static/app.js", "static/index.html", "static/style.css"]
    assert all(any(fnmatch.fnmatch(f, pattern) for pattern in patterns) for f in files)
