"""Data-parallel training on this machine: 1 process against 2 processes (torchrun, gloo on CPU).

The same task (generated alpaca records, the same model, LoRA and learning rate) is trained
twice through the real command line, each in its own subprocess, one after the other:

  1 process    ``sage-finetune run TASK --batch-size B``             (no launcher)
  2 processes  ``sage-finetune run TASK --nproc 2 --batch-size B/2``  (torchrun, DDP on gloo)

with the same global batch (B samples per optimizer step) and the same number of steps. The
cores are shared out: the config's ``num_threads`` is divided among the processes by the
launcher. Because several threads per process can lose badly to other load on the machine
(OpenMP threads spin-waiting for a busy core), the single process runs twice: with all the
cores' threads and with as many threads as each of the 2 processes gets. Printed side by
side: trained tokens per second over the training loop (all ranks together), the training
loop's time, the whole command's wall time (start-up, model loading, data preparation
included), the final logged loss and the thread settings.

On a 2-core machine expect little or no gain: the point is that the 2-process run trains the
same thing (same steps, same global batch, a comparable loss), not speed.

    .venv/bin/python benchmarks/distributed.py [--model DIR|HUB_ID] [--steps 30] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sage_finetune_plugin.config import LoRAConfig, TrainingConfig
from sage_finetune_plugin.meta import TaskMeta, load_meta, save_meta

TINY_MODEL = Path(__file__).resolve().parent.parent / "tests" / "assets" / "tiny-chat-model"
WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa")


def records(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca records of varied length."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        words = rng.choices(WORDS, k=rng.randint(4, 24))
        rows.append(
            {
                "instruction": f"Repeat the list number {i} in reverse order.",
                "input": " ".join(words),
                "output": " ".join(reversed(words)),
            }
        )
    return rows


def make_task(root: Path, name: str, config: TrainingConfig, count: int) -> Path:
    task = root / name
    data = task / "data" / "train.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in records(count)))
    config.replace(data_path="data/train.jsonl", output_dir=str(task)).save(
        task / "training_config.json"
    )
    meta = TaskMeta(
        task_type="custom",
        model=config.model_name,
        format="alpaca",
        dataset="data/train.jsonl",
        config="training_config.json",
        output_dir=".",
        num_samples=count,
    )
    save_meta(task, meta)
    return task


def train(task: Path, nproc: int, threads: int, batch: int, steps: int) -> dict[str, Any]:
    """Train ``task`` with ``nproc`` processes of ``threads`` torch threads each."""
    config = TrainingConfig.load(task / "training_config.json")
    config.replace(num_threads=threads * nproc).save(task / "training_config.json")
    command = [sys.executable, "-m", "sage_finetune_plugin.cli", "run", str(task)]
    command += ["--max-steps", str(steps), "--batch-size", str(batch // nproc), "--force"]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{nproc} process(es) failed:\n{proc.stdout}\n{proc.stderr}")
    metrics = load_meta(task).metrics
    return {"nproc": nproc, "threads": threads, "wall_s": wall, **metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(TINY_MODEL), help="base model [tiny test model]")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="global batch (even)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--records", type=int, default=480)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    config = TrainingConfig(
        model_name=args.model,
        max_length=args.max_length,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        gradient_checkpointing=False,
        logging_steps=5,
        save_steps=10_000,
        report_to="none",
        lora=LoRAConfig(r=8, lora_alpha=16, lora_dropout=0.0),
    )
    print(
        f"model {Path(args.model).name}, {args.steps} steps, global batch {args.batch}, "
        f"max_length {args.max_length}, {cores} cores, load average {os.getloadavg()[0]:.2f}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for nproc, threads in ((1, cores), (1, max(1, cores // 2)), (2, max(1, cores // 2))):
            task = make_task(Path(tmp), f"p{nproc}t{threads}", config, args.records)
            rows.append(train(task, nproc, threads, args.batch, args.steps))
    header = (
        f"{'processes':>9} {'threads/proc':>12} {'batch/proc':>10} {'steps':>5} "
        f"{'tokens/s':>9} {'train s':>8} {'wall s':>7} {'final loss':>10}"
    )
    print(header)
    for row in rows:
        n = row["nproc"]
        print(
            f"{n:>9} {row['threads']:>12} {args.batch // n:>10} "
            f"{row['global_step']:>5} {row['tokens_per_second']:>9.0f} "
            f"{row['train_runtime_s']:>8.1f} {row['wall_s']:>7.1f} {row['train_loss']:>10.4f}"
        )
    two = rows[-1]
    for one in rows[:-1]:
        print(
            f"2 processes vs 1 process with {one['threads']} thread(s): "
            f"{two['tokens_per_second'] / one['tokens_per_second']:.2f}x tokens/s, "
            f"{two['wall_s'] / one['wall_s']:.2f}x wall time"
        )


if __name__ == "__main__":
    main()
