"""Data preparation throughput and padding waste.

Generates alpaca records of varied length, prepares them with SmolLM2-135M-Instruct's tokenizer
(the embedded model, resolved like any run does; ``--tiny`` takes the tiny test model's) with
its chat template, prompt masking and the cache under a temporary directory, and prints
records/s for the first run (load + validate + render + tokenize + statistics + save) and the
second, cached run, with the processes and threads used. Then prints the share of padding
tokens in batches of the prepared lengths: dynamic padding with transformers'
LengthGroupedSampler (what `run` uses for batch > 1), dynamic padding in random order, padding
every sample to max_length (what the original tool did), and packing (flattening: no padding
at all).

    .venv/bin/python benchmarks/prepare_data.py [RECORDS] [BATCH] [MAX_LENGTH] [--tiny]
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "tests" / "assets" / "tiny-chat-model"
WORDS = ["the", "a", "model", "data", "token", "train", "code", "value", "list", "loop", "file"]


def generate(path: Path, count: int, seed: int = 0) -> None:
    """Alpaca records whose lengths spread like real instruction data (long tail)."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for i in range(count):
            instruction = " ".join(rng.choices(WORDS, k=rng.randint(4, 40)))
            context = " ".join(rng.choices(WORDS, k=rng.randint(0, 60))) if i % 3 == 0 else ""
            output = " ".join(rng.choices(WORDS, k=int(rng.lognormvariate(3.5, 0.8)) + 1))
            record = {"instruction": f"Task {i}: {instruction}", "input": context, "output": output}
            handle.write(json.dumps(record) + "\n")


def padding_share(batches: list[list[int]], width: int | None = None) -> float:
    """Padding tokens / all tokens when each batch is padded to its longest (or ``width``)."""
    padded = real = 0
    for lengths in batches:
        padded += (width or max(lengths)) * len(lengths)
        real += sum(lengths)
    return 1 - real / padded


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    count = int(args[0]) if len(args) > 0 else 100_000
    batch = int(args[1]) if len(args) > 1 else 8
    max_length = int(args[2]) if len(args) > 2 else 512

    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from sage_finetune_plugin.config import SMALL_MODEL
    from sage_finetune_plugin.data import prepare_dataset
    from sage_finetune_plugin.models import load_tokenizer

    threads = torch.get_num_threads()
    load = os.getloadavg()[0]
    model = str(TINY_MODEL) if "--tiny" in sys.argv else SMALL_MODEL
    tokenizer = load_tokenizer(model)
    print(f"records {count}, batch {batch}, max_length {max_length}, tokenizer {model}")
    print(
        f"cpus {os.cpu_count()}, torch threads {threads}, TOKENIZERS_PARALLELISM="
        f"{os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}, load average {load:.2f} at start"
    )
    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "alpaca.jsonl"
        generate(data, count)
        size = data.stat().st_size / 2**20
        cache = Path(work) / "cache"
        timings = []
        for _ in range(2):
            start = time.perf_counter()
            prepared = prepare_dataset(data, tokenizer, max_length=max_length, cache_dir=cache)
            timings.append(time.perf_counter() - start)
        stats = prepared.stats
        print(f"data {size:.1f} MiB JSONL; {stats.summary()}".replace("\n", "\n  "))
        print(f"{'run':<10}{'seconds':>10}{'records/s':>12}")
        for name, seconds in zip(("first", "cached"), timings, strict=True):
            print(f"{name:<10}{seconds:>10.2f}{count / seconds:>12,.0f}")

        lengths = list(prepared.train["length"])
    generator = torch.Generator().manual_seed(0)
    grouped = list(LengthGroupedSampler(batch, lengths=lengths, generator=generator))
    shuffled = list(range(len(lengths)))
    random.Random(0).shuffle(shuffled)

    def batches(order: list[int]) -> list[list[int]]:
        return [[lengths[i] for i in order[k : k + batch]] for k in range(0, len(order), batch)]

    print(f"{'batching':<34}{'padding share':>14}")
    rows = [
        ("dynamic, length-grouped", padding_share(batches(grouped))),
        ("dynamic, random order", padding_share(batches(shuffled))),
        (f"pad to max_length={max_length}", padding_share(batches(shuffled), max_length)),
        ("packing (flattened batch)", 0.0),
    ]
    for name, share in rows:
        print(f"{name:<34}{share:>13.1%}")
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
