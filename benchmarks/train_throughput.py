"""Training throughput: this package against TRL's SFTTrainer and the original SAGE design.

The same data (generated alpaca records of varied length), model (SmolLM2-135M-Instruct via
``resolve_model``) and hyperparameters (max_length 512, batch 4, 15 steps, LoRA r16/alpha 32
on q/k/v/o with dropout 0.05, lr 2e-4 cosine, fp32, one torch thread) are trained by:

  ours      sage_finetune_plugin.LoRATrainer (chat template, prompt masking,
            dynamic padding, length-grouped batches)
  ours_random  the same in random order, like the peers: length grouping starts with the
            longest samples, so over a few steps it trains on other samples than the peers;
            this row compares like with like (same seed, same samples as trl and original)
  trl       trl.SFTTrainer with a peft LoraConfig (prompt-completion data, completion-only loss)
  original  the original SAGE design: transformers.Trainer, every sample padded to
            max_length, loss on every token, DataCollatorForLanguageModeling

Each runs in its own subprocess, one after the other. Printed side by side: trained
(non-padding) tokens per second over the training loop, the share of padding in the batches,
the final loss (last logged step; the losses are not comparable across runners, as the
original design also trains on prompts) and the peak RSS of the process.

    .venv/bin/python benchmarks/train_throughput.py [--steps 15] [--only ours trl]

Needs ``pip install trl`` for the TRL column (skipped with a note when missing).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RUNNERS = ("ours", "ours_random", "trl", "original")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
#: TrainingArguments that turn length grouping off (before and after transformers 5).
RANDOM_ORDER = {"group_by_length": False, "train_sampling_strategy": "random"}
ORIGINAL_TEMPLATE = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)
WORDS = [
    *("model", "data", "train", "token", "batch", "layer", "memory", "speed", "loss"),
    *("adapter", "weight", "gradient", "python", "function", "value", "list", "string"),
    *("number", "result", "error", "file", "line", "test"),
]


# --- data ------------------------------------------------------------------------------------


def make_records(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca records of varied length (tens to several hundred tokens), like real data."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            a, b = rng.randint(1, 999), rng.randint(1, 999)
            record = {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a + b}."}
        elif kind == 1:
            numbers = [rng.randint(0, 999) for _ in range(rng.randint(5, 80))]
            record = {
                "instruction": "Sort these numbers in ascending order.",
                "input": " ".join(map(str, numbers)),
                "output": " ".join(map(str, sorted(numbers))),
            }
        elif kind == 2:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 160)))
            record = {
                "instruction": "Rewrite the text in upper case.",
                "input": text,
                "output": text.upper(),
            }
        else:
            n = rng.randint(1, 12)
            body = "\n".join(f"    total += values[{k}] * {k + 1}" for k in range(n))
            record = {
                "instruction": f"Write a Python function that weights the first {n} values.",
                "input": "",
                "output": f"def weighted(values):\n    total = 0\n{body}\n    return total\n",
            }
        records.append(record)
    return records


# --- measuring -------------------------------------------------------------------------------


def proc_status_kib(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as lines:
        return next(int(line.split()[1]) for line in lines if line.startswith(key + ":"))


class CountingCollator:
    """Wraps a collator; records (non-padding, total) tokens of every batch it builds."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator
        self.batches: list[tuple[int, int]] = []

    def __call__(self, rows: list[Any]) -> dict[str, Any]:
        batch = self.collator(rows)
        total = batch["input_ids"].numel()
        mask = batch.get("attention_mask")
        self.batches.append((int(mask.sum()) if mask is not None else total, total))
        return batch


def meter_callback() -> Any:
    """A TrainerCallback timing the training loop and keeping the last logged loss."""
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        started = ended = 0.0
        loss: float | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.ended = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])

    return Meter()


def common_arguments(args: argparse.Namespace, output_dir: str) -> dict[str, Any]:
    """TrainingArguments shared by the TRL and original runners (ours maps its config)."""
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": 1,
        "max_steps": args.steps,
        "learning_rate": args.lr,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "seed": 42,
        "dataloader_num_workers": 0,
        "gradient_checkpointing": args.gradient_checkpointing,
    }


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"
    )


# --- the three runners (each returns its transformers Trainer after training) ---------------


def run_ours(args: argparse.Namespace, workdir: Path, meter: Any, *, grouped: bool = True) -> Any:
    from sage_finetune_plugin import LoRATrainer
    from sage_finetune_plugin.config import LoRAConfig, TrainingConfig

    class CountingTrainer(LoRATrainer):
        def build_trainer(self, model, data):
            trainer = super().build_trainer(model, data)
            trainer.data_collator = CountingCollator(trainer.data_collator)
            return trainer

        def training_arguments(self, data):
            arguments = super().training_arguments(data)
            if not grouped:  # transformers 5 renamed group_by_length
                for name, value in RANDOM_ORDER.items():
                    if hasattr(arguments, name):
                        setattr(arguments, name, value)
            return arguments

    config = TrainingConfig(
        model_name=args.model,
        data_path=str(args.data),
        output_dir=str(workdir / "task"),
        max_length=args.max_length,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_ratio=0.0,
        fp16=False,
        bf16=False,
        gradient_checkpointing=args.gradient_checkpointing,
        logging_steps=1,
        save_steps=10 * args.steps,
        report_to="none",
        num_threads=args.threads,
        lora=LoRAConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS),
    )
    runner = CountingTrainer(config, callbacks=[meter])
    runner.train()
    return runner.trainer


def run_trl(args: argparse.Namespace, workdir: Path, meter: Any) -> Any:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [
        {
            "prompt": [{"role": "user", "content": _prompt(record)}],
            "completion": [{"role": "assistant", "content": record["output"]}],
        }
        for record in _records(args.data)
    ]
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            **common_arguments(args, str(workdir / "trl")),
            max_length=args.max_length,
            packing=False,
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(),
        callbacks=[meter],
    )
    trainer.data_collator = CountingCollator(trainer.data_collator)
    trainer.train()
    return trainer


def run_original(args: argparse.Namespace, workdir: Path, meter: Any) -> Any:
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [ORIGINAL_TEMPLATE.format(**r) + tokenizer.eos_token for r in _records(args.data)]
    dataset = Dataset.from_dict({"text": texts}).map(
        lambda batch: tokenizer(
            batch["text"], truncation=True, max_length=args.max_length, padding="max_length"
        ),
        batched=True,
        remove_columns=["text"],
    )
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    trainer = Trainer(
        model=get_peft_model(model, lora_config()),
        args=TrainingArguments(**common_arguments(args, str(workdir / "original"))),
        train_dataset=dataset,
        data_collator=CountingCollator(DataCollatorForLanguageModeling(tokenizer, mlm=False)),
        callbacks=[meter],
    )
    trainer.train()
    return trainer


def _records(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _prompt(record: dict[str, str]) -> str:
    """The user turn ours builds from an alpaca record: instruction, then input."""
    return (
        f"{record['instruction']}\n\n{record['input']}"
        if record["input"]
        else record["instruction"]
    )


# --- worker and driver -------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Train with one runner in this process and measure it."""
    start_rss = proc_status_kib("VmRSS")
    import torch

    torch.set_num_threads(args.threads)
    meter = meter_callback()
    run = {
        "ours": run_ours,
        "ours_random": functools.partial(run_ours, grouped=False),
        "trl": run_trl,
        "original": run_original,
    }[args.worker]
    with tempfile.TemporaryDirectory(prefix=f"bench-{args.worker}-") as workdir:
        trainer = run(args, Path(workdir), meter)
    # The data loader may build one batch ahead of the last step: count the trained ones.
    batches = trainer.data_collator.batches[: trainer.state.global_step]
    tokens = sum(real for real, _ in batches)
    padded = sum(total for _, total in batches)
    seconds = meter.ended - meter.started
    return {
        "runner": args.worker,
        "steps": trainer.state.global_step,
        "tokens": tokens,
        "padded_tokens": padded,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 2),
        "padding_share": round(1 - tokens / padded, 4) if padded else 0.0,
        "final_loss": meter.loss,
        "peak_rss_bytes": proc_status_kib("VmHWM") * 1024,
        "start_rss_bytes": start_rss * 1024,
        "threads": torch.get_num_threads(),
    }


def run_worker(name: str, args: argparse.Namespace, data: Path, model_path: Path) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--data",
        str(data),
        "--model-path",
        str(model_path),
        *_shared_options(args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        return {"runner": name, "error": f"exit {proc.returncode}:\n{tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _shared_options(args: argparse.Namespace) -> list[str]:
    options = [
        "--model",
        args.model,
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--max-length",
        str(args.max_length),
        "--lr",
        str(args.lr),
        "--threads",
        str(args.threads),
    ]
    return [*options, "--gradient-checkpointing"] if args.gradient_checkpointing else options


def table(results: list[dict[str, Any]]) -> list[str]:
    """The side-by-side table (speed relative to TRL when TRL ran)."""
    trl = next((r for r in results if r.get("runner") == "trl" and "error" not in r), None)
    lines = [
        f"{'runner':<12} {'tokens/s':>9} {'vs TRL':>7} {'padding':>8} {'final loss':>11} "
        f"{'peak RSS':>10} {'train s':>8} {'tokens':>8}"
    ]
    for r in results:
        if "error" in r:
            lines.append(f"{r['runner']:<12} failed: {r['error']}")
            continue
        ratio = f"{r['tokens_per_second'] / trl['tokens_per_second']:.2f}x" if trl else "-"
        loss = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "-"
        lines.append(
            f"{r['runner']:<12} {r['tokens_per_second']:>9.1f} {ratio:>7} "
            f"{r['padding_share']:>8.1%} {loss:>11} {r['peak_rss_bytes'] / 2**30:>6.2f} GiB "
            f"{r['seconds']:>8.1f} {r['tokens']:>8}"
        )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=RUNNERS, default=list(RUNNERS))
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--worker", choices=RUNNERS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model-path", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    from sage_finetune_plugin.models import resolve_model

    model_path = resolve_model(args.model)  # converted once, outside the measured runs
    runners = [name for name in args.only if name != "trl" or _has_trl()]
    if "trl" in args.only and "trl" not in runners:
        print("note: trl is not installed (pip install trl): its column is skipped")
    print(
        f"{args.model}: {args.records} alpaca records, max_length {args.max_length}, "
        f"batch {args.batch}, {args.steps} steps, LoRA r16/32 on q/k/v/o, lr {args.lr:g}, "
        f"{args.threads} torch thread(s), gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}, load average "
        f"{os.getloadavg()[0]:.2f} at start"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        data = Path(tmp) / "alpaca.jsonl"
        data.write_text(
            "".join(json.dumps(r) + "\n" for r in make_records(args.records)), encoding="utf-8"
        )
        for name in runners:
            print(f"running {name} ...", flush=True)
            results.append(run_worker(name, args, data, model_path))
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    print("\n".join(table(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


def _has_trl() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


if __name__ == "__main__":
    sys.exit(main())
