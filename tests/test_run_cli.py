"""`sage finetune run`: options, dry run, exit codes, and a real short run on the tiny model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from sage_finetune_plugin.cli import finetune
from sage_finetune_plugin.meta import load_meta, update_meta

from conftest import run_cli


@pytest.fixture
def task(prepared_task: Path) -> Path:
    return prepared_task


def invoke(*args: str):
    return CliRunner().invoke(finetune, list(args), catch_exceptions=False)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
    }


def test_run_trains_records_the_options_and_prints_the_next_steps(task: Path) -> None:
    result = invoke("run", "demo", "--root", str(task.parent), "--max-steps", "4", "--lora-r", "4")

    assert result.exit_code == 0, result.output
    assert "Trained 4 steps" in result.output
    assert f"Adapter: {task / 'adapter'}" in result.output
    assert "sage finetune chat demo" in result.output
    assert "sage finetune merge demo" in result.output
    meta = load_meta(task)
    assert meta.status == "trained"
    assert meta.training["max_steps"] == 4
    assert meta.training["lora"]["r"] == 4 and meta.training["lora"]["lora_alpha"] == 8


def test_dry_run_prints_the_plan_and_writes_nothing(task: Path) -> None:
    before = snapshot(task)
    result = invoke("run", str(task), "--dry-run", "--preset", "cpu", "--max-length", "48")

    assert result.exit_code == 0, result.output
    for heading in ("Config (", "Device: cpu", "Data:", "Memory:", "Dry run"):
        assert heading in result.output
    assert "max_length: 48" in result.output and "preset: cpu" in result.output
    assert "48 read, 48 valid" in result.output
    assert snapshot(task) == before


@pytest.mark.parametrize(
    "args",
    [
        ["--lr", "-1"],
        ["--lr", "fast"],
        ["--epochs", "0"],
        ["--batch-size", "0"],
        ["--preset", "rtx_9090"],
        ["--4bit", "--8bit"],
        ["--model", " "],
    ],
)
def test_bad_option_values_exit_2(task: Path, args: list[str]) -> None:
    result = invoke("run", str(task), "--dry-run", *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_unknown_task_and_missing_data_exit_1(task: Path) -> None:
    unknown = invoke("run", "nope", "--root", str(task.parent))
    assert unknown.exit_code == 1
    assert "Task 'nope' not found" in unknown.output

    (task / "data" / "train.jsonl").unlink()
    missing = invoke("run", str(task), "--max-steps", "1")
    assert missing.exit_code == 1
    assert "train.jsonl" in missing.output and "Traceback" not in missing.output
    assert load_meta(task).status == "failed"


def test_an_interrupted_task_is_not_started_over_by_accident(task: Path) -> None:
    checkpoint = task / "checkpoints" / "checkpoint-7"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_model.safetensors").write_bytes(b"x")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 7}))
    update_meta(task, status="interrupted")

    result = invoke("run", str(task))
    assert result.exit_code == 1
    assert "checkpoint-7" in result.output and "--resume" in result.output


def test_a_run_in_progress_is_refused(task: Path) -> None:
    import socket

    (task / ".lock").write_text(
        json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started_at": "now"})
    )
    result = invoke("run", str(task), "--max-steps", "1")
    assert result.exit_code == 1
    assert f"being trained by process {os.getppid()}" in result.output


def test_run_through_the_console_script(task: Path) -> None:
    proc = run_cli("sage-finetune", "run", str(task), "--max-steps", "2", "--no-quant")
    assert proc.returncode == 0, proc.stderr
    assert "Trained 2 steps" in proc.stdout
    assert "step 2/2" in proc.stderr  # the progress lines
