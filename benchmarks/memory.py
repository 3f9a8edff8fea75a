"""The memory estimate against the peak RSS of real runs on the CPU (SmolLM2-135M).

Each row trains two steps in a fresh interpreter on samples that all fill max_length and
reports the peak RSS above the bare interpreter's, beside `estimate_memory` for the same
config. Rows: the `cpu` preset's settings unpacked at batch 2 x 512 with gradient
checkpointing, unquantized, 4-bit and 8-bit, at 1 and 2 threads (`--rows` picks some).

    .venv/bin/python benchmarks/memory.py [--rows plain,4bit,8bit] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

from sage_finetune_plugin.config import TrainingConfig
from sage_finetune_plugin.models import resolve_model
from sage_finetune_plugin.presets import PresetConfigs
from sage_finetune_plugin.training.memory import GIB, estimate_memory

ROOT = Path(__file__).resolve().parents[1]
ROWS = {
    "plain": {},
    "4bit": {"load_in_4bit": True, "bnb_4bit_use_double_quant": True},
    "8bit": {"load_in_8bit": True},
}


def measure(config: TrainingConfig, folder: Path) -> int:
    """Peak RSS above the bare interpreter's of two training steps of ``config`` (bytes), as
    the memory test measures it (tests/test_memory.py: one source for both)."""
    spec = importlib.util.spec_from_file_location("test_memory", ROOT / "tests/test_memory.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return int(module.measured_training_rss(config, folder))
    except RuntimeError as exc:
        sys.exit(str(exc))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="plain,4bit,8bit")
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args()
    base = PresetConfigs.cpu().model_name
    resolve_model(base)  # convert the embedded model outside the measured processes
    print(
        f"SmolLM2-135M, cpu preset unpacked 2 x 512, gradient checkpointing, 2 steps; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'row':<6} {'threads':>7} {'estimate':>9} {'measured':>9} {'error':>6}")
    for name in args.rows.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            config = PresetConfigs.cpu().replace(
                packing=False,
                per_device_train_batch_size=2,
                max_length=512,
                gradient_checkpointing=True,
                max_steps=2,
                eval_ratio=0.0,
                num_threads=threads,
                bf16=False,
                **ROWS[name],
            )
            estimate = estimate_memory(config, device="cpu").total
            with tempfile.TemporaryDirectory(prefix="memory-") as tmp:
                measured = measure(config, Path(tmp))
            print(
                f"{name:<6} {threads:>7} {estimate / GIB:>8.2f}G {measured / GIB:>8.2f}G "
                f"{estimate / measured - 1:>+6.0%}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
