"""Training throughput: this package against TRL's SFTTrainer at its best and the original
SAGE design.

The same data (generated alpaca records of varied length, all shorter than max_length), model
(SmolLM2-135M-Instruct via ``resolve_model``) and hyperparameters (max_length 512, batch 4, 15
steps, LoRA r16/alpha 32 on q/k/v/o with dropout 0.05, lr 2e-4 cosine, one torch thread) are
trained by:

  ours          sage_finetune_plugin.LoRATrainer as a user gets it: precision from the runtime
                policy, chat template, prompt masking, the loss on answer tokens only,
                dynamic padding and length-grouped batches (with --packing: packed batches)
  ours_random   the same in random order (what the TRL default and the original design do)
  trl           trl.SFTTrainer with a peft LoraConfig, its defaults: fp32, random order,
                padded batches (prompt-completion data, completion-only loss)
  trl_grouped   TRL at its best, length-grouped: train_sampling_strategy="group_by_length"
  trl_padfree   TRL at its best, padding-free: each batch flattened into one row
  trl_packed    TRL at its best, packed: packing=True (best-fit decreasing into max_length rows)
  trl_*_bf16    the same three in bf16 mixed precision (the others train in fp32)
  original      the original SAGE design: transformers.Trainer, every sample padded to
                max_length, loss on every token, DataCollatorForLanguageModeling

"TRL at its best" is the fastest of the trl_grouped / trl_padfree / trl_packed rows run, in
either precision: TRL's fastest CPU setting is chosen by measurement in the same run. The bf16
rows are skipped (with a note) where the precision probe (training/precision.py) measures bf16
at less than half the speed of fp32 on this CPU (emulated bf16: a 15-step row would take hours);
``--bf16-rows always|never`` overrides. Each runner trains in its own subprocess, one after the
other. Printed side by side: trained (non-padding) tokens per second over the training loop and
relative to TRL at its best, the model FLOPs rate (4 x N FLOPs per token, N = base parameters:
forward plus backward to the activations) and its share of the CPU's peak for the precision
used (the formula is printed), the share of padding, the last logged loss and the mean of all
logged losses (not comparable with the original design, which also trains on prompts), and the
peak RSS of the process.

    .venv/bin/python benchmarks/train_throughput.py [--steps 15] [--only ours trl_grouped]
    .venv/bin/python benchmarks/train_throughput.py --packing

Needs ``pip install trl`` for the TRL rows (skipped with a note when missing).
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

#: TRL's batch layouts as SFTConfig values.
TRL_LAYOUTS = {
    "random": {"train_sampling_strategy": "random"},
    "grouped": {"train_sampling_strategy": "group_by_length"},
    "padfree": {"train_sampling_strategy": "random", "padding_free": True},
    "packed": {"train_sampling_strategy": "random", "packing": True},
}
#: Runners that are TRL at its best (its best layouts, in fp32 and in bf16).
TRL_BEST = tuple(
    f"trl_{layout}{suffix}"
    for layout in ("grouped", "padfree", "packed")
    for suffix in ("", "_bf16")
)
RUNNERS = ("ours", "ours_random", "trl", *TRL_BEST, "original")
DEFAULT_RUNNERS = ("ours", "trl", *TRL_BEST[:4], "original")
PACKING_RUNNERS = ("ours", *TRL_BEST[2:])
#: bf16 rows run only where the precision probe measures bf16 at least this fast against fp32.
BF16_ROWS_MIN_SPEED = 0.5
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
    """Alpaca records of varied length (tens to about 450 tokens with SmolLM2's template, so
    that no runner truncates), like real data."""
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
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 110)))
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
    """A TrainerCallback timing the training loop and keeping the logged losses."""
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        started = ended = 0.0

        def __init__(self) -> None:
            self.losses: list[float] = []
            self.precision = "float32"

        def on_train_begin(self, args, state, control, **kwargs):
            self.precision = "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32"
            self.started = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.ended = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return Meter()


def cpu_peak_gflops(threads: int, precision: str) -> tuple[float, str]:
    """The CPU's peak for ``precision`` on ``threads`` cores, and how it was derived: cores x
    clock (from /proc/cpuinfo: the nominal clock, turbo unknown) x FLOPs per cycle per core
    (x86: two 512-bit FMA units, 2 x 16 x 2 = 64 fp32 FLOPs; bf16 with AMX tiles 1024 (16 x 32
    x 16 multiply-adds per 16 cycles), with AVX512-BF16 alone 128 (VDPBF16PS: 2 x 32 x 2);
    one 256-bit FMA pair (AVX2) 32 fp32 FLOPs)."""
    flags: set[str] = set()
    mhz = 0.0
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as lines:
        for line in lines:
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "flags" and not flags:
                flags = set(value.split())
            elif key == "cpu MHz" and not mhz:
                mhz = float(value)
    ghz = mhz / 1000
    if precision == "bfloat16" and "amx_bf16" in flags:
        per_cycle, how = 1024, "AMX-BF16"
    elif precision == "bfloat16" and "avx512_bf16" in flags:
        per_cycle, how = 128, "AVX512-BF16 (VDPBF16PS)"
    elif "avx512f" in flags:
        per_cycle, how = 64, "AVX-512 fp32 FMA x2"
    else:
        per_cycle, how = 32, "AVX2 fp32 FMA x2"
    peak = threads * ghz * per_cycle
    return peak, f"{threads} core(s) x {ghz:.2f} GHz x {per_cycle} FLOPs/cycle ({how})"


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


def bf16_rows(args: argparse.Namespace) -> tuple[bool, str]:
    """Whether the bf16 rows run, and why: as ``--bf16-rows`` says, or (``auto``) where the
    precision probe measures bf16 at least ``BF16_ROWS_MIN_SPEED`` times as fast as fp32."""
    if args.bf16_rows != "auto":
        return args.bf16_rows == "always", f"--bf16-rows {args.bf16_rows}"
    from sage_finetune_plugin.models import model_config
    from sage_finetune_plugin.training.precision import cpu_precision, probe_shapes

    probe = cpu_precision(*probe_shapes(model_config(args.model)), threads=args.threads)
    return probe.speedup >= BF16_ROWS_MIN_SPEED, probe.reason()


# --- the runners (each returns its transformers Trainer after training) ----------------------


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
        packing=args.packing,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_ratio=0.0,
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


def run_trl(args: argparse.Namespace, workdir: Path, meter: Any, *, layout: str, bf16: bool) -> Any:
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
    settings = dict(TRL_LAYOUTS[layout])
    # Padding-free batches without packing are not truncated (TRL refuses a max_length then):
    # every generated sample is shorter than max_length, so nothing changes.
    unpacked_padding_free = settings.get("padding_free") and not settings.get("packing")
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            **{**common_arguments(args, str(workdir / "trl")), "bf16": bf16},
            max_length=None if unpacked_padding_free else args.max_length,
            **settings,
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


def runner_function(name: str, args: argparse.Namespace) -> Any:
    if name == "ours":
        return run_ours
    if name == "ours_random":
        return functools.partial(run_ours, grouped=False)
    if name == "original":
        return run_original
    if name == "trl":
        return functools.partial(run_trl, layout="random", bf16=False)
    layout = name.removeprefix("trl_").removesuffix("_bf16")
    return functools.partial(run_trl, layout=layout, bf16=name.endswith("_bf16"))


# --- worker and driver -------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Train with one runner in this process and measure it."""
    start_rss = proc_status_kib("VmRSS")
    import torch

    torch.set_num_threads(args.threads)
    meter = meter_callback()
    run = runner_function(args.worker, args)
    with tempfile.TemporaryDirectory(prefix=f"bench-{args.worker}-") as workdir:
        trainer = run(args, Path(workdir), meter)
    # The data loader may build one batch ahead of the last step: count the trained ones.
    batches = trainer.data_collator.batches[: trainer.state.global_step]
    tokens = sum(real for real, _ in batches)
    padded = sum(total for _, total in batches)
    seconds = meter.ended - meter.started
    parameters = sum(
        p.numel() for name, p in trainer.model.named_parameters() if "lora_" not in name
    )
    return {
        "runner": args.worker,
        "steps": trainer.state.global_step,
        "tokens": tokens,
        "padded_tokens": padded,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 2),
        "padding_share": round(1 - tokens / padded, 4) if padded else 0.0,
        "final_loss": meter.losses[-1] if meter.losses else None,
        "mean_loss": sum(meter.losses) / len(meter.losses) if meter.losses else None,
        "precision": meter.precision,
        "base_parameters": parameters,
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
    if args.packing:
        options.append("--packing")
    return [*options, "--gradient-checkpointing"] if args.gradient_checkpointing else options


def table(results: list[dict[str, Any]]) -> list[str]:
    """The side-by-side table (speed relative to the fastest TRL-at-its-best row)."""
    done = [r for r in results if "error" not in r]
    best = max(
        (r for r in done if r["runner"] in TRL_BEST),
        key=lambda r: r["tokens_per_second"],
        default=None,
    )
    lines = [
        f"{'runner':<12} {'precision':>9} {'tokens/s':>9} {'vs best':>8} {'GFLOP/s':>8} "
        f"{'of peak':>8} {'padding':>8} {'final loss':>11} {'mean loss':>10} {'peak RSS':>10} "
        f"{'train s':>8} {'tokens':>7}"
    ]
    for r in results:
        if "error" in r:
            lines.append(f"{r['runner']:<12} failed: {r['error']}")
            continue
        ratio = f"{r['tokens_per_second'] / best['tokens_per_second']:.2f}x" if best else "-"
        gflops = 4 * r["base_parameters"] * r["tokens_per_second"] / 1e9
        peak, _ = cpu_peak_gflops(r["threads"], r["precision"])
        final = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "-"
        mean = f"{r['mean_loss']:.4f}" if r["mean_loss"] is not None else "-"
        lines.append(
            f"{r['runner']:<12} {r['precision'][:9]:>9} {r['tokens_per_second']:>9.1f} "
            f"{ratio:>8} {gflops:>8.1f} {gflops / peak:>8.1%} {r['padding_share']:>8.1%} "
            f"{final:>11} {mean:>10} {r['peak_rss_bytes'] / 2**30:>6.2f} GiB "
            f"{r['seconds']:>8.1f} {r['tokens']:>7}"
        )
    if best:
        lines.append(f"TRL at its best: {best['runner']} ({best['precision']})")
    for precision in sorted({r["precision"] for r in done}):
        peak, how = cpu_peak_gflops(done[0]["threads"], precision)
        lines.append(f"peak {precision}: {peak:.0f} GFLOP/s = {how}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=RUNNERS)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--packing", action="store_true", help="packed batches for ours, TRL's packing layouts"
    )
    parser.add_argument(
        "--bf16-rows",
        choices=("auto", "always", "never"),
        default="auto",
        help="run the bf16 rows (auto: where the precision probe measures bf16 at least half "
        "as fast as fp32)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--worker", choices=RUNNERS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model-path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only is None:
        args.only = list(PACKING_RUNNERS if args.packing else DEFAULT_RUNNERS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    from sage_finetune_plugin.models import resolve_model

    model_path = resolve_model(args.model)  # converted once, outside the measured runs
    runners = [name for name in args.only if not name.startswith("trl") or _has_trl()]
    if len(runners) < len(args.only):
        print("note: trl is not installed (pip install trl): its rows are skipped")
    with_bf16, why = bf16_rows(args)
    if not with_bf16 and any(name.endswith("_bf16") for name in runners):
        runners = [name for name in runners if not name.endswith("_bf16")]
        print(f"note: the bf16 rows are skipped ({why})")
    print(
        f"{args.model}: {args.records} alpaca records, max_length {args.max_length}, "
        f"batch {args.batch}{' packed' if args.packing else ''}, {args.steps} steps, LoRA "
        f"r16/32 on q/k/v/o, lr {args.lr:g}, {args.threads} torch thread(s), gradient "
        f"checkpointing {'on' if args.gradient_checkpointing else 'off'}, load average "
        f"{os.getloadavg()[0]:.2f} at start"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        data = Path(tmp) / "alpaca.jsonl"
        data.write_text(
            "".join(json.dumps(r) + "\n" for r in make_records(args.records)), encoding="utf-8"
        )
        for name in runners:
            print(f"running {name} ... (load average {os.getloadavg()[0]:.2f})", flush=True)
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
