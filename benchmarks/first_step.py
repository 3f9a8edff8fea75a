"""Time from `sage-finetune run` to its first training step, on the embedded SmolLM2-135M.

Creates a task with `quickstart code` (this package's source, the `cpu` preset) in a temporary
root, then starts `sage-finetune run TASK --max-steps 1` in fresh processes, one after the
other, and watches the task's meta: the run writes its progress there at step 1. Prints, per
round, the seconds to the first step and to the end of the process (evaluation and saving
included), then the medians, with the threads and the load average. With ``--profile`` one
more run goes under cProfile (the file is kept) and the slowest calls are printed.

    .venv/bin/python benchmarks/first_step.py [--rounds 3] [--threads 2] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "sage_finetune_plugin"


def first_step(command: list[str], meta: Path, env: dict[str, str]) -> tuple[float, float]:
    """Seconds to step 1 (from the meta's progress) and to the end of the process."""
    data = json.loads(meta.read_text())
    data.pop("progress", None)  # the last round's step 1
    meta.write_text(json.dumps(data, indent=2))
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    stepped = None
    while proc.poll() is None:
        if stepped is None and _step(meta) >= 1:
            stepped = time.perf_counter() - start
        time.sleep(0.02)
    ended = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"run failed:\n{proc.stderr.read().decode()[-3000:]}")
    return stepped if stepped is not None else float("nan"), ended


def _step(meta: Path) -> int:
    try:
        return int(json.loads(meta.read_text()).get("progress", {}).get("step") or 0)
    except (OSError, ValueError):
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    with tempfile.TemporaryDirectory(prefix="first-step-") as tmp:
        root = Path(tmp)
        subprocess.run(
            [bin_dir / "sage-finetune", "quickstart", "code", "--source", SOURCE, "--root", root],
            check=True,
            stdout=subprocess.DEVNULL,
            env=env,
        )
        task = root / "code"
        command = [str(bin_dir / "sage-finetune"), "run", str(task), "--max-steps", "1"]
        print(
            f"sage-finetune run (cpu preset, SmolLM2-135M, data cached by quickstart) "
            f"--max-steps 1; {args.threads} thread(s), load average {os.getloadavg()[0]:.2f}"
        )
        steps, ends = [], []
        for n in range(args.rounds):
            stepped, ended = first_step(command, task / "finetune_meta.json", env)
            steps.append(stepped)
            ends.append(ended)
            print(f"  round {n + 1}: first step after {stepped:.2f} s, process ended {ended:.2f} s")
        first, end = statistics.median(steps), statistics.median(ends)
        print(f"median: first step {first:.2f} s, end {end:.2f} s")
        print(f"load average {os.getloadavg()[0]:.2f} at end")
        if args.profile:
            out = Path(tempfile.gettempdir()) / "first_step.prof"
            profiled = [sys.executable, "-m", "cProfile", "-o", str(out), *command]
            subprocess.run(profiled, check=True, stdout=subprocess.DEVNULL, env=env)
            import pstats

            pstats.Stats(str(out)).sort_stats("cumulative").print_stats(40)
            print(f"profile: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
