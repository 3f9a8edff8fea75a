"""Multi-process training: the launch commands, and real 2-process runs of the tiny model on
CPU (gloo) through the CLI."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sage_finetune_plugin.cli import finetune
from sage_finetune_plugin.cli._common import cli_words
from sage_finetune_plugin.locks import RunLock
from sage_finetune_plugin.meta import load_meta
from sage_finetune_plugin.training.launch import LaunchOptions, launch_command

from conftest import run_cli

CONFIG = Path("/tasks/demo/.launch/config.json")


@pytest.fixture
def task(make_prepared_task) -> Path:
    return make_prepared_task(save_steps=4)


def invoke(*args: str):
    return CliRunner().invoke(finetune, list(args), catch_exceptions=False)


def worker(*extra: str) -> list[str]:
    return ["-m", "sage_finetune_plugin.trainer", "/tasks/demo", "--config", str(CONFIG), *extra]


# --- launch commands ---------------------------------------------------------------------------


def test_torchrun_command_on_the_second_of_two_nodes() -> None:
    options = LaunchOptions(
        nproc=4, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29501
    )

    command = launch_command(Path("/tasks/demo"), options, CONFIG, resume=True)

    assert command == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=4",
        "--node-rank=1",
        "--master-addr=10.0.0.1",
        "--master-port=29501",
        *worker("--resume"),
    ]


def test_single_node_picks_a_free_local_port() -> None:
    command = launch_command(Path("/tasks/demo"), LaunchOptions(nproc=2), CONFIG)

    assert "--nproc-per-node=2" in command and "--master-addr=127.0.0.1" in command
    port = next(arg for arg in command if arg.startswith("--master-port="))
    assert 0 < int(port.split("=")[1]) < 65536
    assert command[-len(worker()) :] == worker()


def test_accelerate_config_is_passed_through_with_only_the_given_overrides(
    tmp_path: Path,
) -> None:
    config = tmp_path / "zero3.yaml"
    alone = launch_command(Path("/tasks/demo"), LaunchOptions(accelerate_config=config), CONFIG)
    across = launch_command(
        Path("/tasks/demo"),
        LaunchOptions(
            nproc=8, nnodes=2, node_rank=1, master_addr="node0", accelerate_config=config
        ),
        CONFIG,
    )

    head = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    assert alone == [*head, *worker()]
    assert across == [
        *head,
        "--num_processes",
        "16",
        "--num_machines",
        "2",
        "--machine_rank",
        "1",
        "--main_process_ip",
        "node0",
        *worker(),
    ]


# --- CLI checks before anything starts ---------------------------------------------------------


def test_a_missing_accelerate_config_is_one_line_exit_1(task: Path) -> None:
    result = invoke("run", str(task), "--accelerate-config", "missing.yaml")

    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: Accelerate config missing.yaml does not exist: write one with `accelerate "
        "config` or pass the path of an existing file."
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--nproc", "0"), "--nproc"),
        (("--nproc", "2", "--nnodes", "2"), "--master-addr"),
        (("--nproc", "2", "--nnodes", "2", "--node-rank", "2", "--master-addr", "h"), "node-rank"),
    ],
)
def test_invalid_process_layouts_are_usage_errors(
    task: Path, args: tuple[str, ...], message: str
) -> None:
    result = invoke("run", str(task), *args)

    assert result.exit_code == 2
    assert message in result.output


def test_a_second_run_is_refused_while_the_task_is_locked(task: Path) -> None:
    with RunLock(task):
        result = invoke("run", str(task), "--nproc", "2", "--max-steps", "2")

    assert result.exit_code == 1
    assert "is being trained by process" in result.output
    assert not (task / "logs").exists()


def test_dry_run_shows_the_launch_command(task: Path) -> None:
    result = invoke("run", str(task), "--dry-run", "--nproc", "2")

    assert result.exit_code == 0, result.output
    launch = [line for line in result.output.splitlines() if line.startswith("Launch: ")]
    assert len(launch) == 1
    assert "torch.distributed.run --nnodes=1 --nproc-per-node=2" in launch[0]
    assert not (task / ".launch").exists()


# --- real runs ---------------------------------------------------------------------------------


def rank_lines(task: Path, rank: int) -> list[str]:
    return (task / "logs" / f"rank-{rank}.log").read_text().splitlines()


@pytest.mark.slow
def test_two_processes_train_once_and_resume(task: Path) -> None:
    run = run_cli(
        "sage-finetune", "run", str(task), "--nproc", "2", "--max-steps", "8", "--batch-size", "2"
    )

    assert run.returncode == 0, run.stdout + run.stderr
    assert "on 2 processes" in run.stdout and "effective batch 4." in run.stdout
    for rank in (0, 1):  # both ranks took part and agree on the step count
        lines = rank_lines(task, rank)
        assert f"rank {rank} of 2 on " in lines[0]
        assert f"[rank {rank}/2] step 8/8 loss" in "\n".join(lines)
        assert any(f"[rank {rank}/2] finished at step 8/8" in line for line in lines)
    meta = load_meta(task)
    assert meta.status == "trained"
    assert meta.metrics["world_size"] == 2 and meta.metrics["effective_batch_size"] == 4
    assert meta.metrics["epochs"] == pytest.approx(8 * 4 / 48, abs=0.01)  # sharded, not copied
    history = meta.metrics["loss_history"]
    assert history[-1]["loss"] < history[0]["loss"] - 0.5
    adapters = sorted(p.relative_to(task) for p in task.rglob("adapter_model.safetensors"))
    assert adapters == [
        Path("adapter/adapter_model.safetensors"),
        Path("checkpoints/checkpoint-4/adapter_model.safetensors"),
        Path("checkpoints/checkpoint-8/adapter_model.safetensors"),
    ]
    assert [p.name for p in (task / "logs").iterdir() if p.suffix != ".log"] == []
    assert not (task / ".lock").exists()

    resumed = run_cli(
        "sage-finetune", "run", str(task), "--nproc", "2", "--resume", "--max-steps", "12"
    )

    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    meta = load_meta(task)
    assert meta.metrics["resumed_from_step"] == 8 and meta.metrics["global_step"] == 12
    assert any("finished at step 12/12" in line for line in rank_lines(task, 1))


@pytest.mark.slow
def test_a_failing_rank_fails_the_run_with_its_error(task: Path) -> None:
    (task / "data" / "train.jsonl").write_text("this is not json\n")

    run = run_cli("sage-finetune", "run", str(task), "--nproc", "2", "--max-steps", "2")

    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, run.stderr
    assert errors[0].startswith("Error: Distributed training failed (exit status 1): rank ")
    assert "train.jsonl" in errors[0] and "rank-" in errors[0]
    records = [json.loads(p.read_text()) for p in (task / "logs").glob("rank-*.error.json")]
    first = min(records, key=lambda record: record["time"])
    # The rank's own error, in the command line's words.
    assert f"rank {first['rank']}: {cli_words(first['message'])} (log: " in errors[0]
    assert rank_lines(task, first["rank"])[-1] == f"Error: {first['message']}"
    assert load_meta(task).status == "failed"
    assert (task / "logs" / "launcher-0.log").is_file()
    assert os.listdir(task).count(".lock") == 0
