"""What a run produced and measured: the engine's outcome, the caller's result, the metrics.

``TrainOutcome`` is what the recipe reports when a run ends (or stops): its metrics, the
config as it ran, the adapted modules, its notes and the data statistics; the task's books
(books.py) record it and hand the caller a ``TrainResult``. torch is imported inside the
function that needs it.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapters import adapter_for
from ..config import TrainingConfig

if TYPE_CHECKING:
    from transformers import TrainerState

    from ..data.prepared import DataStats
    from ..meta import TaskMeta
    from .runtime import Runtime


@dataclass
class TrainResult:
    """What a finished run produced."""

    task_dir: Path
    adapter_path: Path
    metrics: dict[str, Any]
    #: The config as it ran: resolved LoRA targets, precision and optimizer.
    config: TrainingConfig
    target_modules: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def global_step(self) -> int:
        return int(self.metrics.get("global_step", 0))

    @property
    def train_loss(self) -> float | None:
        return self.metrics.get("train_loss")

    @classmethod
    def from_task(cls, task_dir: Path, meta: TaskMeta) -> TrainResult:
        """What a run recorded in the task's meta (read by the launcher after a
        multi-process run)."""
        config = TrainingConfig.from_dict(meta.training or {})
        metrics = dict(meta.metrics or {})
        targets = config.lora.target_modules
        folder = adapter_for(config).folder
        return cls(
            task_dir,
            meta.path(task_dir, meta.adapter_path or folder) or task_dir / folder,
            metrics,
            config,
            list(targets) if isinstance(targets, list) else [],
            list(metrics.get("notes") or []),
        )


@dataclass
class TrainOutcome:
    """What the engine did in a run that ended or stopped (see ``run_metrics``)."""

    metrics: dict[str, Any]
    #: The config as it ran: resolved targets, precision and optimizer.
    config: TrainingConfig
    target_modules: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data_stats: DataStats | None = None


def run_metrics(
    state: TrainerState,
    runtime: Runtime,
    *,
    runtime_s: float,
    wall_time_s: float,
    resumed: dict[str, int] | None,
    effective_batch_size: int,
    world_size: int,
) -> dict[str, Any]:
    """The metrics of a run from the Trainer's state: steps, losses, tokens and speed (of this
    session: a resumed run counts from where it resumed), memory, where it ran."""
    train, evals = loss_histories(state)
    session_tokens = state.num_input_tokens_seen - (resumed["tokens"] if resumed else 0)
    return {
        "global_step": state.global_step,
        "max_steps": state.max_steps,
        "epochs": round(state.epoch or 0.0, 4),
        "train_loss": train[-1]["loss"] if train else None,
        "eval_loss": evals[-1]["loss"] if evals else None,
        "loss_history": train,
        "eval_loss_history": evals,
        "tokens_seen": state.num_input_tokens_seen,
        "tokens_per_second": round(session_tokens / runtime_s, 2) if runtime_s else None,
        "train_runtime_s": round(runtime_s, 2),
        "wall_time_s": round(wall_time_s, 2),
        "peak_memory_bytes": peak_memory_bytes(runtime.device),
        "device": runtime.device,
        "precision": runtime.dtype_name,
        "world_size": world_size,
        "effective_batch_size": effective_batch_size * world_size,
        "resumed_from_step": resumed["step"] if resumed else None,
    }


def loss_histories(state: TrainerState) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and eval loss as ``[{"step", "loss"}]`` from the Trainer's log history."""
    train = [{"step": h["step"], "loss": h["loss"]} for h in state.log_history if "loss" in h]
    evals = [
        {"step": h["step"], "loss": h["eval_loss"]} for h in state.log_history if "eval_loss" in h
    ]
    return train, evals


def peak_memory_bytes(device: str) -> int:
    """Peak memory of this run: allocated CUDA memory on a GPU, else the process's peak RSS."""
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes, Linux: KiB
