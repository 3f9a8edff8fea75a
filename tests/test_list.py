"""`sage finetune list`: table, --json, empty root, broken tasks."""

from __future__ import annotations

import json

from click.testing import CliRunner

from sage_finetune_plugin.cli import finetune
from sage_finetune_plugin.meta import TaskMeta, save_meta


def add_task(root, name, **fields):
    task = root / name
    task.mkdir(parents=True)
    save_meta(task, TaskMeta(**fields))
    return task


def test_empty_or_missing_root_is_helpful(tmp_path):
    result = CliRunner().invoke(finetune, ["list", "--root", str(tmp_path / "none")])
    assert result.exit_code == 0
    assert "No tasks under" in result.output and "quickstart" in result.output


def test_table_shows_every_column(tmp_path):
    root = tmp_path / "root"
    task = add_task(
        root,
        "code",
        task_type="code",
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        format="alpaca",
        status="trained",
        num_samples=120,
        metrics={"global_step": 60, "train_loss": 1.23456},
        adapter_path="adapter",
        tracking={"wandb": {"run_id": "abc123", "path": "team/sage-finetune/abc123"}},
    )
    (task / "adapter").mkdir()
    add_task(root, "qa", task_type="qa", model="m", format="qa")
    result = CliRunner().invoke(finetune, ["list", "--root", str(root)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == [
        "NAME",
        "STATUS",
        "MODEL",
        "FORMAT",
        "SAMPLES",
        "STEPS",
        "LOSS",
        "EVAL",
        "REWARD",
        "TOK/S",
        "KIND",
        "ADAPTER",
        "MERGED",
        "UPDATED",
        "TRACKER",
    ]
    code = lines[1].split()
    assert code[:13] == [
        "code",
        "trained",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "alpaca",
        "120",
        "60",
        "1.2346",
        "-",
        "-",  # no reward: not a GRPO task
        "-",
        "lora",  # a task whose config names no kind: LoRA
        "yes",
        "no",
    ]
    assert code[-1] == "wandb:team/sage-finetune/abc123"  # the tracker run, last
    assert lines[2].split()[:2] == ["qa", "prepared"] and lines[2].split()[-1] == "-"


def test_broken_task_is_listed_and_others_still_show(tmp_path):
    root = tmp_path / "root"
    add_task(root, "good", model="m")
    (root / "bad").mkdir()
    (root / "bad" / "finetune_meta.json").write_text("{broken")
    result = CliRunner().invoke(finetune, ["list", "--root", str(root)])
    assert result.exit_code == 0
    rows = [line.split()[:2] for line in result.stdout.splitlines()[1:]]
    assert rows == [["bad", "broken"], ["good", "prepared"]]
    assert "corrupt JSON" in result.stderr


def test_json_output(tmp_path, monkeypatch):
    root = tmp_path / "root"
    add_task(root, "t", model="m", status="merged", metrics={"global_step": 3})
    monkeypatch.setenv("SAGE_FINETUNE_HOME", str(root))
    result = CliRunner().invoke(finetune, ["list", "--json"])
    data = json.loads(result.stdout)
    assert data["root"] == str(root)
    (task,) = data["tasks"]
    assert task["name"] == "t" and task["status"] == "merged" and task["steps"] == 3
    assert set(task) >= {"model", "format", "samples", "train_loss", "adapter", "merged", "updated"}
