"""sage-finetune-plugin: LoRA / QLoRA fine-tuning for the SAGE command line.

The public API is loaded lazily: importing this package (which every ``sage`` call does
through the plugin entry point) costs nothing; torch, transformers and peft are imported
only when a training, data or model function is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

_LAZY = {
    "TrainingConfig": ".config",
    "LoRAConfig": ".config",
    "PresetConfigs": ".presets",
    "FinetuneError": ".errors",
    "TaskMeta": ".meta",
    "Task": ".task",
    "load_training_data": ".data",
    "prepare_dataset": ".data",
    "format_alpaca_sample": ".data",
    "format_qa_sample": ".data",
    "format_conversation_sample": ".data",
    "format_text_sample": ".data",
    "LoRATrainer": ".training.recipe",
    "PreferenceTrainer": ".training.recipe",
    "TrainResult": ".training.metrics",
    "RunOptions": ".runs",
    "RunPlan": ".runs",
    "plan_run": ".runs",
    "start_run": ".runs",
    "train_from_meta": ".runs",
    "estimate_memory": ".training.memory",
    "evaluate_task": ".evaluation",
    "EvalOptions": ".evaluation",
    "EvalReport": ".evaluation",
    "QuickstartOptions": ".quickstart",
    "quickstart": ".quickstart",
    "PrepareOptions": ".data",
    "Method": ".methods.base",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
