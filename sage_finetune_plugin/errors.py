"""One exception family for the whole plugin.

Services raise these with a message that says what is wrong, where, and what to do. The CLI
turns them into one line on stderr and an exit code (``exit_code``): 1 for an error, 2 for a
usage error. Nothing here imports click.
"""

from __future__ import annotations

from typing import Any


class FinetuneError(Exception):
    """Base class: a problem the user can act on (never a bug in the plugin)."""

    exit_code = 1


class UsageProblem(FinetuneError):
    """An invalid option value or combination on the command line (exit code 2)."""

    exit_code = 2


class ConfigError(FinetuneError):
    """A training or LoRA configuration value is invalid."""


class TaskError(FinetuneError):
    """A task name is invalid, or the task does not exist / already exists."""


class MetaError(FinetuneError):
    """A ``finetune_meta.json`` file cannot be read or is malformed."""


class DataError(FinetuneError):
    """Training data cannot be read, or a record is malformed."""


class ModelError(FinetuneError):
    """A model cannot be found or loaded."""


class DependencyError(FinetuneError):
    """An optional or required third-party package is missing or broken."""


class TrainingError(FinetuneError):
    """Training cannot start or failed."""


class OutOfMemoryError(TrainingError):
    """The device ran out of memory; the message says what to lower."""


class TrainingInterrupted(TrainingError):
    """Training stopped on Ctrl-C / SIGTERM; the message says how to resume (exit code 130).
    ``outcome``: what the run did until it stopped (a ``TrainOutcome``), when it stopped at the
    end of a step."""

    exit_code = 130

    def __init__(self, message: str, outcome: Any = None) -> None:
        super().__init__(message)
        self.outcome = outcome


class EvaluationInterrupted(FinetuneError):
    """An evaluation stopped on Ctrl-C; nothing was written (exit code 130)."""

    exit_code = 130


class LockError(FinetuneError):
    """Another process is working on the same task."""


class MergeError(FinetuneError):
    """An adapter cannot be merged into its base model."""


class ExportError(FinetuneError):
    """A model cannot be exported (unsupported architecture or tokenizer, existing output)."""


class ServeError(FinetuneError):
    """A serving engine cannot be started, or stopped before it was ready."""


class RewardError(FinetuneError):
    """A reward function cannot be loaded, or failed or returned the wrong thing (GRPO)."""


class PluginError(FinetuneError):
    """A third-party unit (a training method registered by another package) cannot be used."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
