"""Which adapter a task has: the final one, numbered checkpoints, and how complete each is.

A checkpoint is ``<task>/checkpoints/checkpoint-N``, ordered by N as a number (checkpoint-500
before checkpoint-1000), complete once the Trainer wrote ``trainer_state.json`` (its last
file). An adapter folder is complete when peft can load it. Reads folders only; imports
nothing heavy.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import TaskError

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
#: The weights of a whole model (full and freeze runs save one instead of an adapter).
MODEL_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def list_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """``checkpoint-N`` folders as (N, path), oldest first (numeric order, not string order)."""
    checkpoints_dir = Path(checkpoints_dir)
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
    if not is_complete_adapter(path, need_config=False):
        return False
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(state, dict) and "global_step" in state


def complete_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoints training finished writing, as ``(step, path)`` in numeric step order."""
    return [(s, p) for s, p in list_checkpoints(checkpoints_dir) if is_complete_checkpoint(p)]


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones (a crash while saving) are skipped."""
    complete = complete_checkpoints(checkpoints_dir)
    return complete[-1][1] if complete else None


def is_complete_adapter(path: Path, *, need_config: bool = True) -> bool:
    """A folder peft can load an adapter from, or (full and freeze runs) a whole model."""
    path = Path(path)
    if any((path / name).is_file() for name in MODEL_FILES):
        return not need_config or (path / "config.json").is_file()
    has_weights = any((path / name).is_file() for name in ADAPTER_FILES)
    return has_weights and (not need_config or (path / "adapter_config.json").is_file())


def find_adapter(
    task_dir: Path, final: Path, checkpoints_dir: Path, choice: str | int = "final"
) -> tuple[Path, str]:
    """The adapter of a task to use and its label: ``final`` (the adapter ``run`` saved at the
    end, in ``final``), ``latest`` or a step number (a checkpoint). Raises TaskError saying
    what exists instead."""
    wanted = str(choice).strip().lower()
    checkpoints = complete_checkpoints(checkpoints_dir)
    if wanted == "final":
        if is_complete_adapter(final):
            return final, "final"
        hint = " (or use a checkpoint with checkpoint=latest)" if checkpoints else ""
        raise TaskError(
            f"Task {task_dir} has no trained adapter at {final}: "
            f"run training first: sage finetune run {task_dir}{hint}."
        )
    if not checkpoints:
        raise TaskError(
            f"Task {task_dir} has no complete checkpoint under {checkpoints_dir}: "
            f"run training first: sage finetune run {task_dir}."
        )
    if wanted == "latest":
        step, path = checkpoints[-1]
        return path, f"checkpoint-{step}"
    if not wanted.isdigit():
        raise TaskError(f"checkpoint must be final, latest or a step number, got {choice!r}.")
    by_step = dict(checkpoints)
    if int(wanted) not in by_step:
        steps = ", ".join(str(step) for step, _ in checkpoints)
        raise TaskError(f"Task {task_dir} has no checkpoint-{int(wanted)}; available: {steps}.")
    return by_step[int(wanted)], f"checkpoint-{int(wanted)}"
