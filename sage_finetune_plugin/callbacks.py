"""Trainer callbacks: the progress bar, and a graceful stop on Ctrl-C.

``ProgressCallback`` replaces transformers' own bar: one tqdm bar over the optimizer steps with
the last loss, the learning rate and the trained tokens per second (non-padding tokens, from
the Trainer's ``num_input_tokens_seen``), plus one line per logging step so the loss curve
stays readable in the terminal.

``StopOnSignal`` turns the first SIGINT/SIGTERM into "save a checkpoint at the end of this
step and stop"; a second one interrupts at once.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from transformers import TrainerCallback


class ProgressCallback(TrainerCallback):
    """A tqdm progress bar with loss, learning rate and tokens/s (written to stderr)."""

    def __init__(self, file: Any = None) -> None:
        self.file = file
        self.bar: Any = None
        self.loss: float | None = None
        self.lr: float | None = None
        self._start = 0.0
        self._start_tokens = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from tqdm.auto import tqdm

        if not state.is_world_process_zero:  # one bar per run, not one per process
            return
        self.bar = tqdm(
            total=state.max_steps,
            initial=state.global_step,
            unit="step",
            desc="training",
            dynamic_ncols=True,
            file=self.file or sys.stderr,
        )
        self._start = time.perf_counter()
        self._start_tokens = state.num_input_tokens_seen

    def tokens_per_second(self, state: Any) -> float:
        elapsed = time.perf_counter() - self._start
        return (state.num_input_tokens_seen - self._start_tokens) / elapsed if elapsed > 0 else 0.0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is None:
            return
        self.bar.update(state.global_step - self.bar.n)
        postfix = {"tok/s": f"{self.tokens_per_second(state):.0f}"}
        if self.loss is not None:
            postfix["loss"] = f"{self.loss:.4f}"
        if self.lr is not None:
            postfix["lr"] = f"{self.lr:.2e}"
        self.bar.set_postfix(postfix, refresh=False)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if self.bar is None or not logs:
            return
        self.loss = logs.get("loss", self.loss)
        self.lr = logs.get("learning_rate", self.lr)
        parts = [f"step {state.global_step}/{state.max_steps}"]
        if "loss" in logs:
            parts.append(f"loss {logs['loss']:.4f}")
        if "eval_loss" in logs:
            parts.append(f"eval_loss {logs['eval_loss']:.4f}")
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.2e}")
        if len(parts) > 1:
            parts.append(f"{self.tokens_per_second(state):.0f} tok/s")
            self.bar.write("  ".join(parts), file=self.bar.fp)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StopOnSignal(TrainerCallback):
    """Stop after the current step and save a checkpoint when SIGINT or SIGTERM arrives."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # the second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopOnSignal]:
        """Route the signals here for the duration of a ``with`` block (main thread only)."""
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
        self.requested = _on_any_rank(self.requested, args)
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        return control


class RankLogCallback(TrainerCallback):
    """In a multi-process run, a line from every rank at each logging step and at the end, so
    each rank's log shows its share of the work."""

    def _say(self, args: Any, text: str) -> None:
        print(f"[rank {args.process_index}/{args.world_size}] {text}", file=sys.stderr, flush=True)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if logs and "loss" in logs:
            self._say(args, f"step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._say(
            args,
            f"finished at step {state.global_step}/{state.max_steps}, "
            f"{state.num_input_tokens_seen} tokens trained by all ranks",
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
