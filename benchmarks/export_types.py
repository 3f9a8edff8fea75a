"""Export SmolLM2-135M-Instruct (the embedded model) in every type this installation writes
and print, for each: the file size, the export's own check (tensors read back, next-token
agreement and largest logit difference against the model on the check text) and the time.

    .venv/bin/python benchmarks/export_types.py [--quants f16,q4_0] [--out DIR]

The model is used as it is (a task whose merged model is the embedded model's folder), so the
figures are those of the writer, not of a fine-tune. docs/export.md quotes them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from sage_finetune_plugin.export import available_quants, export_task
from sage_finetune_plugin.meta import TaskMeta, save_meta
from sage_finetune_plugin.models import embedded_model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quants", default=",".join(available_quants()))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model = embedded_model_dir()
    root = args.out or Path(tempfile.mkdtemp(prefix="export-types-"))
    task = root / "smol"
    save_meta(
        task,
        TaskMeta(
            model=str(model),
            status="merged",
            merged_path=str(model),
            training={"model_name": str(model)},
        ),
    )
    print(f"model {model}\nfiles in {task / 'export'}")
    print(f"{'type':8} {'size':>9}  seconds  check")
    for quant in args.quants.split(","):
        start = time.perf_counter()
        result = export_task(task, quant=quant, force=True)
        seconds = time.perf_counter() - start
        size = f"{result.size_bytes / 2**20:.1f} MiB"
        print(f"{quant:8} {size:>9}  {seconds:7.1f}  {result.check.line()}", flush=True)


if __name__ == "__main__":
    main()
