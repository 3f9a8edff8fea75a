"""Ways to adapt SmolLM2-135M compared on the facts of the end-to-end test (issue 22).

Each row trains the embedded SmolLM2-135M-Instruct on the invented facts of
``tests/test_e2e_facts.py`` (six question/answer pairs, four times each) with the same budget
(16 steps of 6 samples, constant learning rate, no warm-up, the ``cpu`` preset otherwise), in
its own subprocess, one after the other: LoRA, DoRA, rsLoRA at r 16 and r 64, PiSSA, LoRA+,
full and freeze fine-tuning. Printed per row: trainable parameters, the memory estimate of the
run (training/memory.py) and the measured peak resident memory of the training process (before
the recall check loads anything), trained tokens per second, the final training loss, and
recall: how many of the six questions ``chat`` answers with the invented fact afterwards
(greedy, 16 new tokens), as the end-to-end test asks them.

The learning rate is each kind's own (LoRA 2e-3 as in the end-to-end test; LoRA+ 5e-4 for A,
16x for B; full and freeze 1e-4; the ``_lr`` rows: rsLoRA r64 and PiSSA at a lower one, freeze
at a higher one): the budget, data and steps are the same.

    .venv/bin/python benchmarks/adapters.py [--threads 1] [--only lora full] [--json out.json]
    .venv/bin/python benchmarks/adapters.py --table out.json more.json   # the table again
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STEPS = 16

#: name -> (label, config overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("LoRA r16", {}),
    "dora": ("DoRA r16", {"lora": {"use_dora": True}}),
    "rslora16": ("rsLoRA r16", {"lora": {"use_rslora": True}}),
    "rslora64": ("rsLoRA r64", {"lora": {"use_rslora": True, "r": 64, "lora_alpha": 32}}),
    "rslora64_lr": (
        "rsLoRA r64, lr 5e-4",
        {"lora": {"use_rslora": True, "r": 64, "lora_alpha": 32}, "learning_rate": 5e-4},
    ),
    "pissa": ("PiSSA r16", {"lora": {"init_lora_weights": "pissa_niter_4"}}),
    "pissa_lr": (
        "PiSSA r16, lr 2e-4",
        {"lora": {"init_lora_weights": "pissa_niter_4"}, "learning_rate": 2e-4},
    ),
    "loraplus": (
        "LoRA+ r16 (ratio 16)",
        {"lora": {"loraplus_lr_ratio": 16.0}, "learning_rate": 5e-4},
    ),
    "full": ("full", {"finetuning_type": "full", "learning_rate": 1e-4}),
    "freeze": (
        "freeze (last 4 layers)",
        {"finetuning_type": "freeze", "freeze_trainable_layers": 4, "learning_rate": 1e-4},
    ),
    "freeze_lr": (
        "freeze (last 4 layers), lr 1e-3",
        {"finetuning_type": "freeze", "freeze_trainable_layers": 4, "learning_rate": 1e-3},
    ),
}


def _facts() -> tuple[dict[str, str], Any]:
    """FACTS and ``knows`` of the end-to-end test (one source for both)."""
    spec = importlib.util.spec_from_file_location("e2e_facts", ROOT / "tests/test_e2e_facts.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FACTS, module.knows


def worker(name: str, folder: Path, threads: int) -> dict[str, Any]:
    """Train one variant in this process and measure it."""
    import torch
    from click.testing import CliRunner

    from sage_finetune_plugin.chat import ChatSession, load_chat_model
    from sage_finetune_plugin.cli import finetune
    from sage_finetune_plugin.config import SMALL_MODEL
    from sage_finetune_plugin.meta import load_meta
    from sage_finetune_plugin.runs import RunOptions, plan_run, start_run
    from sage_finetune_plugin.training.memory import estimate_memory

    torch.set_num_threads(threads)
    facts, knows = _facts()
    data = folder / "facts.jsonl"
    records = [{"question": q, "answer": f"{a}."} for q, a in facts.items()] * 4
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    root = folder / "root"
    args = ["quickstart", "qa", "--data", str(data), "--name", name, "--preset", "cpu"]
    created = CliRunner().invoke(finetune, [*args, "--model", SMALL_MODEL, "--root", str(root)])
    if created.exit_code != 0:
        raise SystemExit(created.output)
    task = root / name
    label, changes = VARIANTS[name]
    overrides = {
        "max_steps": STEPS,
        "per_device_train_batch_size": len(facts),
        "learning_rate": 2e-3,
        "lr_scheduler_type": "constant",
        "warmup_ratio": 0.0,
        "save_steps": 1000,
        "eval_ratio": 0.0,
        "report_to": "none",
        "num_threads": threads,
        **changes,
    }
    plan = plan_run(task, RunOptions(overrides=overrides))
    estimate = plan.memory
    started = time.perf_counter()
    result = start_run(plan)
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    metrics = result.metrics
    # The plan's estimate assumes samples of max_length; this one the data's longest sample.
    longest = int(load_meta(task).data_stats.get("length_max") or plan.config.max_length)
    at_data = estimate_memory(plan.config, seq_len=longest)
    chat = load_chat_model(task)
    recalled = 0
    answers = {}
    for question, fact in facts.items():
        answer = ChatSession(chat, max_new_tokens=16).generate(question)
        answers[question] = answer
        recalled += knows(answer, fact)
    return {
        "name": name,
        "label": label,
        "learning_rate": plan.config.learning_rate,
        "trainable": estimate.trainable_parameters if estimate else None,
        "estimate_bytes": estimate.total if estimate else None,
        "estimate_data_bytes": at_data.total,
        "longest_sample": longest,
        "peak_rss_bytes": peak,
        "tokens_per_second": metrics.get("tokens_per_second"),
        "train_loss": metrics.get("train_loss"),
        "train_wall_s": wall,
        "precision": plan.runtime.dtype_name,
        "recall": recalled,
        "questions": len(facts),
        "answers": answers,
    }


def run_variant(name: str, threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"adapters-{name}-") as folder:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "SAGE_FINETUNE_HOME": folder}
        out = Path(folder) / "result.json"
        command = [sys.executable, __file__, "--worker", name, "--folder", folder]
        command += ["--threads", str(threads), "--out", str(out)]
        proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            return {"name": name, "label": VARIANTS[name][0], "error": proc.stderr[-2000:]}
        return json.loads(out.read_text())


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | lr | trainable params | estimate (max_length / data) | measured peak RSS "
        "| tokens/s | load avg | final loss | recall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "error" in row:
            last = row["error"].strip().splitlines()[-1:] or ["?"]
            lines.append(f"| {row['label']} | failed: {last[0]} |")
            continue
        lines.append(
            f"| {row['label']} | {row['learning_rate']:g} | {row['trainable'] / 1e6:,.2f}M | "
            f"{row['estimate_bytes'] / 2**30:.2f} / {_data_estimate(row)} GiB | "
            f"{row['peak_rss_bytes'] / 2**30:.2f} GiB | "
            f"{row['tokens_per_second']:.0f} | {_load(row)} | {row['train_loss']:.3f} | "
            f"{row['recall']}/{row['questions']} |"
        )
    return "\n".join(lines)


def _load(row: dict[str, Any]) -> str:
    """The 1-minute load average when the row ended (other jobs on a shared machine)."""
    load = row.get("load_average")
    return f"{load[0]:.1f}" if load else "-"


def _data_estimate(row: dict[str, Any]) -> str:
    value = row.get("estimate_data_bytes")
    return f"{value / 2**30:.2f}" if value else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS))
    parser.add_argument("--json", type=Path, help="Also write the rows as JSON.")
    parser.add_argument(
        "--table",
        type=Path,
        nargs="+",
        help="Print the table of earlier --json files (a later file's row replaces an earlier "
        "one of the same variant) instead of running.",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.out.write_text(json.dumps(worker(args.worker, args.folder, args.threads)))
        return 0
    if args.table:
        merged: dict[str, dict[str, Any]] = {}
        for path in args.table:
            merged.update({row["name"]: row for row in json.loads(path.read_text())["rows"]})
        print(table([merged[name] for name in VARIANTS if name in merged]))
        return 0

    from sage_finetune_plugin.config import SMALL_MODEL
    from sage_finetune_plugin.models import resolve_model

    resolve_model(SMALL_MODEL)  # converted once, outside the measured runs
    cpu = next(
        (line.split(":", 1)[1].strip() for line in _lscpu() if line.startswith("Model name")),
        platform.processor(),
    )
    print(f"CPU: {cpu}; {args.threads} thread(s); load average before: {os.getloadavg()}")
    rows = []
    for name in args.only or list(VARIANTS):
        row = run_variant(name, args.threads)
        row["load_average"] = os.getloadavg()
        rows.append(row)
        print(f"{row['label']}: {json.dumps({k: v for k, v in row.items() if k != 'answers'})}")
        sys.stdout.flush()
    print(table(rows))
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "threads": args.threads, "rows": rows}))
    return 0


def _lscpu() -> list[str]:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    except OSError:
        return []


if __name__ == "__main__":
    raise SystemExit(main())
