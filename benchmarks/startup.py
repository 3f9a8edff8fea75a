"""Start-up cost of the plugin inside the `sage` host.

Times `sage --help` and `sage version` with the plugin registered and with plugin loading
switched off (the host's entry-point lookup returns nothing), interleaved, in fresh processes,
and prints the medians side by side, with `sage finetune --help` and `sage-finetune --help`.

    .venv/bin/python benchmarks/startup.py [ROUNDS]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

HOST = """
import sys
import sage.cli.main as host
if {disabled}:
    host.entry_points = lambda group: []
sys.argv = ["sage", *{args!r}]
try:
    sys.exit(host.main())
except SystemExit as exc:
    sys.exit(exc.code)
"""


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def host_argv(args: list[str], disabled: bool) -> list[str]:
    return [sys.executable, "-c", HOST.format(disabled=disabled, args=args)]


def main(rounds: int = 15) -> None:
    bin_dir = os.path.dirname(sys.executable)
    cases = {
        "sage --help (no plugins)": host_argv(["--help"], True),
        "sage --help (with finetune)": host_argv(["--help"], False),
        "sage version (no plugins)": host_argv(["version"], True),
        "sage version (with finetune)": host_argv(["version"], False),
        "sage finetune --help": host_argv(["finetune", "--help"], False),
        "sage-finetune --help": [os.path.join(bin_dir, "sage-finetune"), "--help"],
    }
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for argv in cases.values():  # warm the file cache
        timed(argv)
    for _ in range(rounds):
        for name, argv in cases.items():
            samples[name].append(timed(argv))
    print(f"{rounds} rounds, interleaved, median and min wall seconds (cpu count {os.cpu_count()})")
    for name, values in samples.items():
        print(f"  {name:32s} median {statistics.median(values):.3f}  min {min(values):.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
