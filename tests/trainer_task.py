"""A prepared task on the tiny model, laid out as `quickstart` leaves it (CONTRACTS.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sage_finetune_plugin.config import LoRAConfig, TrainingConfig
from sage_finetune_plugin.meta import TaskMeta, save_meta

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def records(count: int = 48) -> list[dict[str, str]]:
    """Alpaca records with short, regular answers a tiny model learns in a few steps."""
    return [
        {
            "instruction": f"Write the number {i % 10} as a word.",
            "input": "",
            "output": f"The number {i % 10} is written {WORDS[i % 10]}.",
        }
        for i in range(count)
    ]


def write_data(path: Path, count: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records(count)))
    return path


def tiny_config(model_dir: Path, **changes: Any) -> TrainingConfig:
    """Hyperparameters under which the tiny model's loss falls clearly in ~20 steps."""
    values: dict[str, Any] = {
        "model_name": str(model_dir),
        "max_length": 64,
        "max_steps": 20,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 3e-3,
        "warmup_ratio": 0.0,
        "gradient_checkpointing": False,
        "logging_steps": 2,
        "save_steps": 10,
        "report_to": "none",
        "lora": LoRAConfig(r=8, lora_alpha=16, lora_dropout=0.0),
    }
    values.update(changes)
    return TrainingConfig(**values)


def make_task(root: Path, model_dir: Path, name: str = "demo", **changes: Any) -> Path:
    """Task dir with data/train.jsonl, training_config.json and a `prepared` meta."""
    task_dir = root / name
    write_data(task_dir / "data" / "train.jsonl")
    config = tiny_config(model_dir, data_path="data/train.jsonl", output_dir=str(task_dir))
    config = config.replace(**changes)
    config.save(task_dir / "training_config.json")
    meta = TaskMeta(
        task_type="custom",
        model=str(model_dir),
        format="alpaca",
        dataset="data/train.jsonl",
        config="training_config.json",
        output_dir=".",
        num_samples=48,
        training=config.to_dict(),
    )
    save_meta(task_dir, meta)
    return task_dir
