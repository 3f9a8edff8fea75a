"""Trainer callbacks: progress reports, a graceful stop on Ctrl-C or `cancel`, a stop on a
non-finite loss or gradient, rank logs.

``ProgressCallback`` turns the Trainer's events into ``RunProgress`` events (step, loss,
learning rate, trained tokens per second) handed to a sink: the task's books record them in
the meta and pass them on; the command layer draws them as a progress bar. Nothing here
prints.

``StopOnSignal`` turns the first SIGINT/SIGTERM, or a cancel request file written by
``sage finetune cancel``, into "save a checkpoint at the end of this step and stop"; a second
signal interrupts at once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..progress import Progress

logger = logging.getLogger(__name__)


@dataclass
class RunProgress(Progress):
    """A snapshot of a run: ``done`` optimizer steps of ``total`` (also ``step`` and
    ``max_steps``). ``event`` is ``start``, ``step`` (after each optimizer step), ``log`` (a
    logging or evaluation step; ``logs`` holds what the Trainer logged) or ``end``."""

    label: str = "training"
    tokens_per_second: float = 0.0
    loss: float | None = None
    learning_rate: float | None = None
    logs: dict[str, float] = field(default_factory=dict)
    #: The last mean reward of a run that samples and scores (GRPO), and its KL.
    reward: float | None = None
    kl: float | None = None

    def rewards(self) -> dict[str, float]:
        """The logging step's mean reward per reward function (TRL's ``rewards/NAME/mean``)."""
        return _per_reward(self.logs, "")

    @property
    def step(self) -> int:
        return self.done

    @property
    def max_steps(self) -> int:
        return self.total

    def postfix(self) -> dict[str, str]:
        figures = {"tok/s": f"{self.tokens_per_second:.0f}"}
        if self.loss is not None:
            figures["loss"] = f"{self.loss:.4f}"
        if self.learning_rate is not None:
            figures["lr"] = f"{self.learning_rate:.2e}"
        if self.reward is not None:
            figures["reward"] = f"{self.reward:.3f}"
        if self.kl is not None:
            figures["kl"] = f"{self.kl:.4f}"
        return figures

    def line(self) -> str:
        """The logging step as one line: step, loss, eval loss, learning rate, tokens/s."""
        parts = [f"step {self.step}/{self.max_steps}"]
        if "loss" in self.logs:
            parts.append(f"loss {self.logs['loss']:.4f}")
        if "eval_loss" in self.logs:
            parts.append(f"eval_loss {self.logs['eval_loss']:.4f}")
        if "learning_rate" in self.logs:
            parts.append(f"lr {self.logs['learning_rate']:.2e}")
        for prefix in ("", "eval_"):
            parts += _sampling_parts(self.logs, prefix)
        parts.append(f"{self.tokens_per_second:.0f} tok/s")
        return "  ".join(parts)


def _per_reward(logs: dict[str, float], prefix: str) -> dict[str, float]:
    start = f"{prefix}rewards/"
    return {
        key[len(start) : -len("/mean")]: value
        for key, value in logs.items()
        if key.startswith(start) and key.endswith("/mean")
    }


def _sampling_parts(logs: dict[str, float], prefix: str) -> list[str]:
    """A sampling run's logged figures (GRPO): mean reward (per function), completion length,
    KL."""
    parts = []
    if f"{prefix}reward" in logs:
        per = ", ".join(f"{k} {v:.2f}" for k, v in _per_reward(logs, prefix).items())
        parts.append(f"{prefix}reward {logs[f'{prefix}reward']:.3f}" + (f" ({per})" if per else ""))
    if f"{prefix}completions/mean_length" in logs:
        parts.append(f"{prefix}completion {logs[f'{prefix}completions/mean_length']:.1f} tok")
    if f"{prefix}kl" in logs:
        parts.append(f"{prefix}kl {logs[f'{prefix}kl']:.4f}")
    return parts


class ProgressCallback(TrainerCallback):
    """Reports the run to ``sink`` from the main process only (one report per run)."""

    def __init__(self, sink: Callable[[RunProgress], None]) -> None:
        self.sink = sink
        self.loss: float | None = None
        self.lr: float | None = None
        self.reward: float | None = None
        self.kl: float | None = None
        self._start = 0.0
        self._start_tokens = 0

    def _emit(self, event: str, state: Any, logs: dict[str, float] | None = None) -> None:
        elapsed = time.perf_counter() - self._start
        tokens = state.num_input_tokens_seen - self._start_tokens
        self.sink(
            RunProgress(
                event,
                state.global_step,
                state.max_steps,
                tokens_per_second=tokens / elapsed if elapsed > 0 else 0.0,
                loss=self.loss,
                learning_rate=self.lr,
                logs=dict(logs or {}),
                reward=self.reward,
                kl=self.kl,
            )
        )

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self._start = time.perf_counter()
            self._start_tokens = state.num_input_tokens_seen
            self._emit("start", state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self._emit("step", state)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        self.loss = logs.get("loss", self.loss)
        self.lr = logs.get("learning_rate", self.lr)
        self.reward = logs.get("reward", self.reward)
        self.kl = logs.get("kl", self.kl)
        if any(key in logs for key in ("loss", "eval_loss")):
            numbers = {k: float(v) for k, v in logs.items() if isinstance(v, int | float)}
            self._emit("log", state, numbers)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self._emit("end", state)


class StopOnSignal(TrainerCallback):
    """Stop after the current step and save a checkpoint when SIGINT or SIGTERM arrives, or
    when ``cancel_file`` appears (``sage finetune cancel`` from another terminal)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, cancel_file: Path | None = None) -> None:
        self.requested = False
        self.cancel_file = cancel_file

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # the second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopOnSignal]:
        """Route the signals here for the duration of a ``with`` block (main thread only);
        the handlers from before are restored afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        cancelled = self.cancel_file is not None and self.cancel_file.exists()
        self.requested = _on_any_rank(self.requested or cancelled, args)
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        return control


@dataclass(frozen=True)
class NonFinite:
    """Where a run went non-finite: the optimizer ``step`` (1-based), ``what`` was not finite
    (``gradient norm``, ``loss``), its ``value``, and whether the weights are still those of
    the step before (``intact``: the step's update was not applied)."""

    step: int
    what: str
    value: float
    intact: bool


class StopOnNonFinite(TrainerCallback):
    """Stop the run at the first optimizer step whose gradients are not finite (NaN or
    infinite), before the optimizer applies them: the step's gradients are dropped (an optimizer
    skips a parameter without a gradient), so the weights stay those of the last good step and
    a checkpoint of them is saved at the end of the step (none when no step succeeded).

    Under fp16 the gradient scaler skips an overflowing step by itself, so there only a
    non-finite logged loss stops the run (the weights may be damaged by then: the newest earlier
    checkpoint is the last good state). ``failure`` tells what happened."""

    def __init__(self) -> None:
        self.failure: NonFinite | None = None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if args.fp16 or model is None or self.failure is not None:
            return
        norm = _gradient_norm(model)
        if _on_any_rank(not math.isfinite(norm), args):
            self.failure = NonFinite(state.global_step + 1, "gradient norm", norm, intact=True)
            model.zero_grad(set_to_none=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.failure is not None:
            control.should_training_stop = True
            control.should_evaluate = False
            # The weights are those of the step before: worth a checkpoint unless untrained.
            control.should_save = self.failure.intact and self.failure.step > 1
        return control

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> Any:
        if self.failure is not None or not logs:
            return control
        loss = logs.get("loss")
        if isinstance(loss, int | float) and not math.isfinite(loss):
            self.failure = NonFinite(state.global_step, "loss", float(loss), intact=False)
            control.should_training_stop = True
            control.should_save = False
        return control


def _gradient_norm(model: Any) -> float:
    """The 2-norm of all gradients of ``model`` (0.0 without any), with one device sync."""
    import torch

    norms = [
        torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32)
        for p in model.parameters()
        if p.grad is not None
    ]
    if not norms:
        return 0.0
    device = norms[0].device
    return float(torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms])))


class RankLogCallback(TrainerCallback):
    """In a multi-process run, a log record from every rank at each logging step and at the
    end, so each rank's log shows its share of the work."""

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if logs and "loss" in logs:
            logger.info(
                "[rank %d/%d] step %d/%d loss %.4f",
                args.process_index,
                args.world_size,
                state.global_step,
                state.max_steps,
                logs["loss"],
            )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        logger.info(
            "[rank %d/%d] finished at step %d/%d, %d tokens trained by all ranks",
            args.process_index,
            args.world_size,
            state.global_step,
            state.max_steps,
            state.num_input_tokens_seen,
        )


def _on_any_rank(flag: bool, args: Any) -> bool:
    """``flag`` or'ed over all processes, so that every rank stops at the same step (a rank
    that stopped alone would leave the others waiting in the next gradient all-reduce)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=args.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
