"""``python -m sage_finetune_plugin.trainer TASK_DIR [--resume]``: train a task from its meta.

The same run as ``sage finetune run TASK_DIR [--resume]``, through the same run service (its
checks included), without the rest of the command line. With ``--config FILE`` it is one rank
of a multi-process run, started by the launcher with the config it resolved.

``LoRATrainer`` and ``train_from_meta`` are still importable from here, as before the
package had a training engine of its own.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import FinetuneError

if TYPE_CHECKING:
    from .training.metrics import TrainResult

_MOVED = {
    "LoRATrainer": ".training.recipe",
    "TrainResult": ".training.metrics",
    "train_from_meta": ".runs",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sage_finetune_plugin.trainer",
        description="Train a task from its finetune_meta.json.",
    )
    parser.add_argument("task_dir", help="task directory (holds finetune_meta.json)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="train with this resolved training config instead of the meta's (written by "
        "`sage finetune run --nproc`, so that every rank trains the same one)",
    )
    args = parser.parse_args(argv)
    from .cli._common import ProgressBar, cli_words, enable_console_logging, summary_lines
    from .runs import RunOptions, plan_run, run_worker, start_run
    from .training.distributed import is_main_process, launched, worker_output

    enable_console_logging()  # before the worker's output is teed: its banner is logged
    bar = ProgressBar()
    result: TrainResult | None
    try:
        with worker_output(args.task_dir):
            if args.config is not None:
                result = run_worker(args.task_dir, Path(args.config), args.resume, progress=bar)
            else:
                plan = plan_run(args.task_dir, RunOptions(resume=args.resume))
                result = start_run(plan, progress=bar)
            bar.close()
            if result is not None and is_main_process() and not launched():
                print("\n".join(summary_lines(result, args.task_dir)), flush=True)
    except FinetuneError as exc:
        bar.close()
        if not launched():  # a launched worker's error went to its rank log and the launcher
            print(f"Error: {cli_words(str(exc))}", file=sys.stderr)
        return exc.exit_code
    return 0


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __package__), name)


if __name__ == "__main__":
    sys.exit(main())
