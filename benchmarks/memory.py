"""The memory estimate against the peak RSS of real runs on the CPU (SmolLM2-135M).

Each row trains two steps in a fresh interpreter on samples that all fill max_length and
reports the peak RSS above the bare interpreter's, beside `estimate_memory` for the same
config. Rows: the `cpu` preset's settings unpacked at batch 2 x 512 with gradient
checkpointing, unquantized, 4-bit and 8-bit, at 1 and 2 threads (`--rows` picks some).

    .venv/bin/python benchmarks/memory.py [--rows plain,4bit,8bit] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from sage_finetune_plugin.config import TrainingConfig
from sage_finetune_plugin.models import resolve_model
from sage_finetune_plugin.presets import PresetConfigs
from sage_finetune_plugin.training.memory import GIB, estimate_memory

#: Run in a fresh interpreter: train, then print the RSS at start-up and the peak (KiB).
TRAIN_AND_MEASURE = """
import json, sys
def status(key):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) for line in lines if line.startswith(key + ":"))
start = status("VmRSS")
from sage_finetune_plugin.config import TrainingConfig
from sage_finetune_plugin.training.recipe import LoRATrainer
LoRATrainer(TrainingConfig.from_dict(json.loads(sys.argv[1]))).train()
print(json.dumps({"start": start, "peak": status("VmHWM")}))
"""
ROWS = {
    "plain": {},
    "4bit": {"load_in_4bit": True, "bnb_4bit_use_double_quant": True},
    "8bit": {"load_in_8bit": True},
}


def measure(config: TrainingConfig, folder: Path) -> int:
    """Peak RSS in bytes of training ``config`` above the bare interpreter's."""
    data = folder / "data.jsonl"
    with data.open("w", encoding="utf-8") as out:
        for i in range(32):
            numbers = " ".join(str(n) for n in range(i, i + 2 * config.max_length))
            out.write(json.dumps({"instruction": f"Count from {i}.", "output": numbers}) + "\n")
    config = config.replace(
        data_path=str(data), output_dir=str(folder / "task"), report_to="none", save_steps=1000
    )
    proc = subprocess.run(
        [sys.executable, "-c", TRAIN_AND_MEASURE, json.dumps(config.to_dict())],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    return (rss["peak"] - rss["start"]) * 1024


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
