"""The task lifecycle: a real run stopped from another process with `cancel` and resumed,
its live progress in `list`, and `delete`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from sage_finetune_plugin.cli import finetune
from sage_finetune_plugin.meta import load_meta, update_meta

from conftest import BIN, run_cli


def invoke(*args: str):
    return CliRunner().invoke(finetune, list(args))


def listed(root: Path) -> dict:
    proc = run_cli("sage-finetune", "list", "--json", "--root", str(root), check=True)
    (row,) = json.loads(proc.stdout)["tasks"]
    return row


def test_cancel_stops_a_real_run_from_another_process_and_resume_finishes(
    make_prepared_task,
) -> None:
    task = make_prepared_task(max_steps=400, logging_steps=1, save_steps=1000)
    root = task.parent
    run = subprocess.Popen(
        [str(BIN / "sage-finetune"), "run", "demo", "--root", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        row = {}
        while time.monotonic() < deadline and run.poll() is None:
            row = listed(root)
            if row["running"] and (row["steps"] or 0) >= 3:
                break
            time.sleep(0.5)
        assert row.get("running"), f"the run did not start: {run.poll()} {row}"
        # list shows the run's live progress, updated at every logging step
        assert row["status"] == "training" and row["max_steps"] == 400
        assert row["train_loss"] is not None and row["tokens_per_second"] > 0
        table = run_cli("sage-finetune", "list", "--root", str(root), check=True).stdout
        assert "/400" in table.splitlines()[1]

        cancel = run_cli("sage-finetune", "cancel", "demo", "--root", str(root))
        assert cancel.returncode == 0, cancel.stderr
        assert "Stopped 'demo' at step" in cancel.stdout and "--resume" in cancel.stdout
        _, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 130, stderr  # what Ctrl-C gives
    meta = load_meta(task)
    stopped = meta.metrics["global_step"]
    assert meta.status == "interrupted" and 3 <= stopped < 400
    assert (task / "checkpoints" / f"checkpoint-{stopped}").is_dir()
    assert not (task / ".cancel").exists()  # the request ended with the run
    assert listed(root)["running"] is False

    resumed = invoke(
        "run", "demo", "--root", str(root), "--resume", "--max-steps", str(stopped + 2)
    )
    assert resumed.exit_code == 0, resumed.output
    meta = load_meta(task)
    assert meta.status == "trained" and meta.metrics["resumed_from_step"] == stopped
    assert meta.metrics["global_step"] == stopped + 2


def test_cancel_without_a_run_says_so(prepared_task: Path) -> None:
    result = invoke("cancel", "demo", "--root", str(prepared_task.parent))
    assert result.exit_code == 1
    assert "is not training (status prepared): nothing to cancel" in result.output


def hold_lock(task: Path, pid: int, host: str | None = None) -> None:
    record = {"pid": pid, "host": host or socket.gethostname(), "started_at": "now"}
    (task / ".lock").write_text(json.dumps(record))


def test_delete_removes_a_task(prepared_task: Path) -> None:
    result = invoke("delete", "demo", "--root", str(prepared_task.parent))
    assert result.exit_code == 0, result.output
    assert "Deleted task 'demo'" in result.output
    assert not prepared_task.exists()
    assert list(prepared_task.parent.iterdir()) == []  # nothing left aside either


def test_delete_is_refused_while_the_task_trains(prepared_task: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        hold_lock(prepared_task, holder.pid)
        update_meta(prepared_task, status="training")
        for args in ([], ["--force"]):
            result = invoke("delete", "demo", "--root", str(prepared_task.parent), *args)
            assert result.exit_code == 1
            assert f"being trained by process {holder.pid}" in result.output
            assert "sage finetune cancel" in result.output
        assert prepared_task.is_dir()
    finally:
        holder.kill()
        holder.wait()


def test_delete_of_a_crashed_run_needs_force(prepared_task: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    hold_lock(prepared_task, dead.pid)  # a kill -9 leaves the lock and the status behind
    update_meta(prepared_task, status="training")
    row = invoke("list", "--root", str(prepared_task.parent)).output.splitlines()[1]
    assert row.split()[:2] == ["demo", "crashed"]
    refused = invoke("delete", "demo", "--root", str(prepared_task.parent))
    assert refused.exit_code == 1 and "--force" in refused.output
    assert prepared_task.is_dir()
    forced = invoke("delete", "demo", "--root", str(prepared_task.parent), "--force")
    assert forced.exit_code == 0 and not prepared_task.exists()


def test_delete_a_task_locked_on_another_host_needs_force(prepared_task: Path) -> None:
    hold_lock(prepared_task, 12345, host="some-other-machine")
    refused = invoke("delete", "demo", "--root", str(prepared_task.parent))
    assert refused.exit_code == 1 and "some-other-machine" in refused.output
    assert invoke("delete", "demo", "--root", str(prepared_task.parent), "--force").exit_code == 0


def test_delete_a_broken_task_and_refuse_other_folders(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "bad").mkdir(parents=True)
    (root / "bad" / "finetune_meta.json").write_text("{broken")
    assert invoke("delete", "bad", "--root", str(root)).exit_code == 0
    assert not (root / "bad").exists()
    (root / "plain").mkdir()
    result = invoke("delete", "plain", "--root", str(root))
    assert result.exit_code == 1 and "not found" in result.output
    assert (root / "plain").is_dir()


@pytest.mark.parametrize("command", ["cancel", "delete"])
def test_unknown_task(command: str, tmp_path: Path) -> None:
    result = invoke(command, "nope", "--root", str(tmp_path))
    assert result.exit_code == 1 and "Task 'nope' not found" in result.output
