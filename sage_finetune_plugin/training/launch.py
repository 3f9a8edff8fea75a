"""Training on several processes, GPUs or machines through torchrun or ``accelerate launch``.

The launching process (``sage finetune run TASK --nproc N``) resolves the training config
once, with every command-line override applied, and writes it to ``<task>/.launch/config.json``;
each worker runs ``python -m sage_finetune_plugin.trainer TASK --config that-file``, so all
ranks train exactly the same config (one source of truth). The launcher holds the run lock
for the whole run (on node 0), so the workers do not take it (see distributed.py for the
workers' side). A failed run is reported by the first failure in time (the root cause, not
the ranks that then lost their peer) as one line. Imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, FinetuneError, TrainingError, TrainingInterrupted, UsageProblem
from ..meta import TaskStatus
from ..paths import LAUNCH_CONFIG, LOGS_DIR
from .distributed import LAUNCHED_ENV, error_record, rank_log
from .metrics import TrainResult

if TYPE_CHECKING:
    from ..config import TrainingConfig
    from ..task import Task
    from .runtime import Hardware

DEFAULT_MASTER_PORT = 29500


# --- the launcher -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchOptions:
    """How many processes to start, and where (torchrun's terms)."""

    nproc: int | None = None  # per node; None: 1, or the accelerate config's num_processes
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    accelerate_config: Path | None = None

    @property
    def distributed(self) -> bool:
        """Whether the run needs a launcher at all."""
        return (self.nproc or 1) > 1 or self.nnodes > 1 or self.accelerate_config is not None

    @property
    def single_node(self) -> bool:
        return self.nnodes == 1

    def validate(self) -> None:
        if self.nproc is not None and self.nproc < 1:
            raise UsageProblem(f"nproc must be at least 1 (got {self.nproc}).")
        if self.nnodes < 1:
            raise UsageProblem(f"nnodes must be at least 1 (got {self.nnodes}).")
        if not 0 <= self.node_rank < self.nnodes:
            raise UsageProblem(
                f"node_rank={self.node_rank} is not between 0 and {self.nnodes - 1} (nodes "
                "count from 0)."
            )
        if not self.single_node and not self.master_addr:
            raise UsageProblem(
                f"nnodes={self.nnodes} needs master_addr=ADDRESS: the address of node 0, "
                "reachable from every node."
            )
        config = self.accelerate_config
        if config is not None and not Path(config).is_file():
            raise ConfigError(
                f"Accelerate config {config} does not exist: write one with `accelerate config` "
                "or pass the path of an existing file."
            )


def free_port() -> int:
    """A TCP port that is free on this machine right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_command(
    task_dir: Path, options: LaunchOptions, config_file: Path, *, resume: bool = False
) -> list[str]:
    """The command that starts this node's workers (torchrun, or accelerate launch with the
    user's config file passed through unchanged; only options given explicitly override it)."""
    worker = ["-m", "sage_finetune_plugin.trainer", str(task_dir), "--config", str(config_file)]
    if resume:
        worker.append("--resume")
    if options.accelerate_config is not None:
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(options.accelerate_config),
            *_accelerate_overrides(options),
            *worker,
        ]
    addr = options.master_addr or "127.0.0.1"
    port = options.master_port or (free_port() if options.single_node else DEFAULT_MASTER_PORT)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={options.nnodes}",
        f"--nproc-per-node={options.nproc or 1}",
        f"--node-rank={options.node_rank}",
        f"--master-addr={addr}",
        f"--master-port={port}",
        *worker,
    ]


def _accelerate_overrides(options: LaunchOptions) -> list[str]:
    args: list[str] = []
    if options.nproc is not None:  # accelerate counts processes over all machines
        args += ["--num_processes", str(options.nproc * options.nnodes)]
    if not options.single_node:
        args += ["--num_machines", str(options.nnodes), "--machine_rank", str(options.node_rank)]
    if options.master_addr:
        args += ["--main_process_ip", options.master_addr]
    if options.master_port:
        args += ["--main_process_port", str(options.master_port)]
    return args


def launch(
    task: Task,
    config: TrainingConfig,
    options: LaunchOptions,
    hardware: Hardware,
    *,
    resume: bool = False,
) -> TrainResult | None:
    """Train ``task`` with ``config`` on this node's share of the processes.

    Returns the result read from the meta on the node that holds rank 0, None on the others
    (their meta lives on node 0). A failed rank raises TrainingError with that rank's error.
    """
    options.validate()
    task_dir = task.path.resolve()
    holds_rank0 = options.node_rank == 0
    with task.lock() if holds_rank0 else contextlib.nullcontext():
        task.clear_cancel()
        config_file = write_launch_config(task_dir, config, options, hardware)
        ranks = _local_ranks(options)
        _clear_rank_files(task_dir, ranks)
        command = launch_command(task_dir, options, config_file, resume=resume)
        returncode, launcher_errors = _run(command, _worker_env(config, options))
        task.clear_cancel()
    if returncode != 0:
        _write_launcher_log(task_dir, options, launcher_errors)
        error = _failure(task, returncode, ranks if ranks else None, launcher_errors)
        if holds_rank0:
            _mark_failed(task)
        raise error
    return TrainResult.from_task(task.path, task.reload()) if holds_rank0 else None


def write_launch_config(
    task_dir: Path, config: TrainingConfig, options: LaunchOptions, hardware: Hardware
) -> Path:
    """Write the config every worker trains with; CPU threads are shared among this node's
    processes (``num_threads`` is per process)."""
    if config.num_threads and not hardware.cuda:
        per_process = max(1, config.num_threads // (options.nproc or 1))
        config = config.replace(num_threads=per_process)
    path = launch_config_path(task_dir)
    config.save(path)
    return path


def launch_config_path(task_dir: Path) -> Path:
    """Where the launcher writes the config all ranks train with."""
    return Path(task_dir) / LAUNCH_CONFIG


def _local_ranks(options: LaunchOptions) -> list[int]:
    """Global ranks of this node's workers (unknown for an accelerate config alone)."""
    if options.nproc is None:
        return []
    first = options.node_rank * options.nproc
    return list(range(first, first + options.nproc))


def _clear_rank_files(task_dir: Path, ranks: list[int]) -> None:
    logs = task_dir / LOGS_DIR
    stale = (
        [p for r in ranks for p in (rank_log(task_dir, r), error_record(task_dir, r))]
        if ranks
        else [*logs.glob("rank-*.log"), *logs.glob("rank-*.error.json")]
    )
    for path in stale:
        path.unlink(missing_ok=True)


def _worker_env(config: TrainingConfig, options: LaunchOptions) -> dict[str, str]:
    env = dict(os.environ, **{LAUNCHED_ENV: "1"})
    if config.num_threads:
        env.setdefault("OMP_NUM_THREADS", str(max(1, config.num_threads // (options.nproc or 1))))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _run(command: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    """Run the launcher; returns its exit status and its stderr lines.

    It runs in its own session: Ctrl-C reaches it once, through us, and it forwards one SIGINT
    to each worker (which then save a checkpoint at the same step). Its stderr (its own
    reports, and what workers print before their rank log is open) is kept for the failure
    message and ``logs/launcher-<node>.log`` instead of flooding the console.
    """
    process = subprocess.Popen(
        command, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr or ()), daemon=True)
    reader.start()
    try:
        returncode = process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)
        try:
            returncode = process.wait()
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
    reader.join(timeout=10)
    return returncode, lines


def _write_launcher_log(task_dir: Path, options: LaunchOptions, lines: list[str]) -> None:
    path = task_dir / LOGS_DIR / f"launcher-{options.node_rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")


def _failure(
    task: Task, returncode: int, ranks: list[int] | None, launcher_errors: list[str]
) -> FinetuneError:
    """The first rank's error (the root cause), as one line."""
    task_dir = task.path
    records = []
    for path in sorted((task_dir / LOGS_DIR).glob("rank-*.error.json")):
        with contextlib.suppress(OSError, ValueError):
            records.append(json.loads(path.read_text(encoding="utf-8")))
    if ranks is not None:
        records = [r for r in records if r.get("rank") in ranks] or records
    with contextlib.suppress(FinetuneError):
        if task.reload().status == TaskStatus.INTERRUPTED:
            return TrainingInterrupted(
                f"Training of {task_dir} interrupted: continue with "
                f"`sage finetune run {task_dir} --resume` (and the same --nproc)."
            )
    if not records:
        last = next((line.strip() for line in reversed(launcher_errors) if line.strip()), "")
        return TrainingError(
            f"Distributed training of {task_dir} failed (launcher exit status {returncode}) "
            f"before a rank reported an error: {last or 'no message'} (logs: {task_dir / LOGS_DIR})"
        )
    first = min(records, key=lambda r: r.get("time", 0.0))
    log = rank_log(task_dir, int(first.get("rank", 0)))
    return TrainingError(
        f"Distributed training failed (exit status {returncode}): rank {first.get('rank')}: "
        f"{first.get('message')} (log: {log})"
    )


def _mark_failed(task: Task) -> None:
    """A rank 0 that was stopped because another rank failed could not record it."""
    with contextlib.suppress(FinetuneError):
        if task.reload().status == TaskStatus.TRAINING:
            task.update(status=TaskStatus.FAILED)
