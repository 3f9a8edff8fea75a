"""Helpers of the training recipe: device and precision, optimizer fallbacks, quantization,
checkpoints, metrics and the loss plot.

Small functions with no state; trainer.py strings them together. torch, transformers and
matplotlib are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import re
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import TrainingConfig
from .errors import ConfigError
from .launch import fsdp_enabled

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig, TrainerState

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")

#: Paged optimizers page their states to host memory through CUDA unified memory; elsewhere
#: the non-paged twin does the same job.
UNPAGED = {
    "paged_adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_32bit": "adamw_torch",
    "paged_lion_8bit": "lion_8bit",
    "paged_lion_32bit": "lion_32bit",
    "paged_ademamix_8bit": "ademamix_8bit",
    "paged_ademamix_32bit": "ademamix",
}
#: Optimizers that run bitsandbytes kernels (CUDA and CPU backends, not Apple MPS).
BNB_OPTIMIZERS = {
    *UNPAGED,
    "adamw_bnb_8bit",
    "adamw_8bit",
    "lion_8bit",
    "lion_32bit",
    "ademamix",
    "ademamix_8bit",
    "rmsprop_bnb",
    "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit",
}


@dataclass
class Runtime:
    """Where and how a run trains, resolved from the config and the hardware."""

    device: str  # "cuda", "mps" or "cpu"
    fp16: bool
    bf16: bool
    optim: str
    notes: list[str] = field(default_factory=list)

    @property
    def dtype_name(self) -> str:
        return "bfloat16" if self.bf16 else "float16" if self.fp16 else "float32"

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype_name)


def resolve_runtime(config: TrainingConfig) -> Runtime:
    """Device, mixed precision and optimizer for ``config`` on this machine.

    Precision: bf16 where the GPU supports it, fp16 on CUDA without bf16, fp32 on CPU and
    Apple MPS; an explicit ``fp16``/``bf16`` in the config wins (fp16 only on CUDA).
    """
    import torch

    notes: list[str] = []
    quantized = config.load_in_4bit or config.load_in_8bit
    if torch.cuda.is_available():
        device = "cuda"
    elif _mps_available() and not quantized:
        device = "mps"
    else:
        device = "cpu"
        if _mps_available():
            notes.append("bitsandbytes quantization has no Apple MPS kernels: training on the CPU")
    fp16, bf16 = _precision(config, device)
    return Runtime(device, fp16, bf16, _optimizer(config.optim, device, notes), notes)


def _mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def _precision(config: TrainingConfig, device: str) -> tuple[bool, bool]:
    import torch

    if config.fp16 and device != "cuda":
        raise ConfigError(
            f"fp16 mixed precision needs a CUDA GPU and this run trains on {device}: "
            "unset fp16 (fp32 is chosen) or use bf16."
        )
    bf16_ok = device != "cuda" or torch.cuda.is_bf16_supported()
    if config.bf16 and not bf16_ok:
        raise ConfigError("This GPU does not support bf16: use fp16, or leave precision unset.")
    if config.fp16 or config.bf16:
        return bool(config.fp16), bool(config.bf16)
    if device != "cuda":
        return False, False
    bf16 = bf16_ok and config.bf16 is None
    fp16 = not bf16 and config.fp16 is None
    return fp16, bf16


def _optimizer(name: str, device: str, notes: list[str]) -> str:
    if device == "cuda":
        return name
    chosen = UNPAGED.get(name, name)
    if device == "mps" and chosen in BNB_OPTIMIZERS:
        chosen = "adamw_torch"
    if chosen != name:
        notes.append(f"optimizer {name} needs CUDA: using {chosen} on {device}")
    return chosen


def quantization_config(config: TrainingConfig, runtime: Runtime) -> BitsAndBytesConfig | None:
    """The bitsandbytes settings for a 4-bit (QLoRA) or 8-bit base model, or None."""
    if not (config.load_in_4bit or config.load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if config.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=config.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=runtime.dtype,
        # FSDP flattens the 4-bit weights with the rest: they must be stored in that dtype.
        bnb_4bit_quant_storage=runtime.dtype if fsdp_enabled() else None,
    )


# --- checkpoints -------------------------------------------------------------------------------


def list_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """``checkpoint-N`` folders as (N, path), oldest first (numeric order, not string order)."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for child in checkpoints_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def is_complete_checkpoint(path: Path) -> bool:
    """A checkpoint the Trainer finished writing: adapter weights plus a readable
    ``trainer_state.json`` (written last)."""
    if not (path / "adapter_model.safetensors").is_file():
        return False
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(state, dict) and "global_step" in state


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones (a crash while saving) are skipped."""
    for _, path in reversed(list_checkpoints(checkpoints_dir)):
        if is_complete_checkpoint(path):
            return path
    return None


# --- metrics ---------------------------------------------------------------------------------


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


def plot_loss(
    train: list[dict[str, Any]], evals: list[dict[str, Any]], path: Path, title: str
) -> Path | None:
    """Write the loss curve to ``path`` (PNG); None when there is nothing to plot.

    Uses matplotlib's object API with the Agg canvas, so the caller's pyplot backend is left
    alone.
    """
    if not train and not evals:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for history, label, style in ((train, "train", "-"), (evals, "eval", "o--")):
        if history:
            steps, losses = [h["step"] for h in history], [h["loss"] for h in history]
            axes.plot(steps, losses, style, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
