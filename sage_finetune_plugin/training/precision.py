"""Precision on the CPU, chosen by measuring this machine rather than by a rule.

Whether bf16 mixed precision trains faster than fp32 on a CPU depends on more than its
instruction set: the same AVX512-BF16 made training 1.56x faster on an AMD EPYC (Zen 4) and
1.4x slower on a Xeon whose hypervisor hides AMX (oneDNN's bf16 matrix products ran at 0.54x
the fp32 rate there). So the first CPU run on a machine times a probe that stands for a
training step: the model's MLP pair (hidden -> intermediate -> hidden, frozen weights as under
LoRA, gradients flowing back to the input) on 512 tokens, forward and backward, in fp32 and
under bf16 autocast, interleaved, the best of several rounds each (about a second in all). A
CPU without bf16 instructions (AVX2 alone, say) is not probed: there bf16 is emulated, and was
measured 25x slower than fp32 on an AMD EPYC (Zen 3).
bf16 is chosen when it is at least ``BF16_MIN_SPEEDUP`` faster. The verdict is cached per
machine under the cache directory (``precision.json``), keyed by the CPU model, its ISA, torch
and oneDNN versions, the thread count and the probe's shapes; ``sage finetune doctor --bench``
measures again. ``bf16=True`` / ``bf16=False`` in the config still decide without a probe.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import platform
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from ..paths import atomic_write_text, cache_dir, read_json_object

logger = logging.getLogger(__name__)

#: bf16 is chosen when the probe runs at least this much faster in it than in fp32.
BF16_MIN_SPEEDUP = 1.10
#: Tokens per probe step (half the cpu preset's packed row of 4 x 256).
PROBE_TOKENS = 512
#: Seconds each precision is timed for, at least (after a warm-up step and 3 rounds), unless
#: the probe has run ``PROBE_LIMIT`` times as long.
PROBE_SECONDS = 0.4
PROBE_LIMIT = 6
#: Shapes probed when the model's configuration cannot be read (SmolLM2-135M's).
DEFAULT_SHAPES = (576, 1536)
#: Bumped when the probe changes, so that older verdicts are measured again.
PROBE_VERSION = 1
CACHE_FILE = "precision.json"


@dataclass(frozen=True)
class PrecisionProbe:
    """What the probe measured on this machine: seconds per probe step in fp32 and in bf16
    autocast, for a model of ``hidden`` x ``intermediate`` on ``threads`` threads."""

    fp32_s: float
    bf16_s: float
    hidden: int
    intermediate: int
    threads: int
    cpu: str
    measured_at: str
    #: Seconds the probe took, warm-ups included.
    cost_s: float = 0.0
    cached: bool = False

    @property
    def speedup(self) -> float:
        """How many times faster a step ran in bf16 than in fp32."""
        return self.fp32_s / self.bf16_s if self.bf16_s > 0 else 0.0

    @property
    def bf16(self) -> bool:
        return self.speedup >= BF16_MIN_SPEEDUP

    def reason(self) -> str:
        """The measurement in a few words, for the dry run."""
        verdict = "bf16" if self.bf16 else "fp32"
        when = "cached" if self.cached else f"measured in {self.cost_s:.1f} s"
        return (
            f"measured on this CPU: bf16 {self.speedup:.2f}x the speed of fp32 (probe step "
            f"{self.fp32_s * 1e3:.0f} ms fp32, {self.bf16_s * 1e3:.0f} ms bf16, {self.threads} "
            f"thread(s), {when}), so {verdict}"
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("cached")
        return data


def probe_shapes(model_config: Any) -> tuple[int, int]:
    """The probe's (hidden, intermediate) sizes for a transformers model configuration."""
    hidden = getattr(model_config, "hidden_size", None)
    intermediate = getattr(model_config, "intermediate_size", None)
    if isinstance(hidden, int) and isinstance(intermediate, int) and hidden and intermediate:
        return hidden, intermediate
    return DEFAULT_SHAPES


def cpu_precision(
    hidden: int, intermediate: int, *, threads: int | None = None, refresh: bool = False
) -> PrecisionProbe:
    """The verdict for this machine and these shapes: from the cache, or measured now (and
    cached). ``threads``: the run's thread count (torch's current one when None)."""
    import torch

    threads = threads or torch.get_num_threads()
    key = _machine_key(hidden, intermediate, threads)
    path = cache_dir() / CACHE_FILE
    verdicts = read_json_object(path)
    if not refresh and key in verdicts:
        with contextlib.suppress(TypeError):
            return PrecisionProbe(**verdicts[key], cached=True)
    probe = measure(hidden, intermediate, threads=threads)
    verdicts[key] = probe.to_dict()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(verdicts, indent=1, sort_keys=True) + "\n")
    except OSError as exc:  # a read-only cache: measured again next time
        logger.warning("Could not cache the precision probe in %s: %s", path, exc)
    return probe


def measure(hidden: int, intermediate: int, *, threads: int) -> PrecisionProbe:
    """Time the probe step in fp32 and in bf16 autocast on ``threads`` threads."""
    import torch

    started = time.perf_counter()
    with _threads(threads), torch.random.fork_rng():
        torch.manual_seed(0)
        up = torch.nn.Linear(hidden, intermediate, bias=False).requires_grad_(False)
        down = torch.nn.Linear(intermediate, hidden, bias=False).requires_grad_(False)
        inputs = torch.randn(PROBE_TOKENS, hidden, requires_grad=True)

        def step(bf16: bool) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = down(torch.nn.functional.silu(up(inputs)))
            out.float().square().mean().backward()
            inputs.grad = None

        best = {False: float("inf"), True: float("inf")}
        spent = {False: 0.0, True: 0.0}
        for bf16 in (False, True):  # warm-up: oneDNN builds its kernels
            best[bf16] = _timed(step, bf16)
        rounds = 0
        # Interleaved rounds (a busy moment hits both alike), the best of each; a precision so
        # slow that its warm-up alone used up the budget (emulated bf16) is not timed again.
        while (
            sum(best.values()) < PROBE_LIMIT * PROBE_SECONDS
            and (rounds < 3 or min(spent.values()) < PROBE_SECONDS)
            and sum(spent.values()) < PROBE_LIMIT * PROBE_SECONDS
        ):
            rounds += 1
            for bf16 in (False, True):
                took = _timed(step, bf16)
                best[bf16] = min(best[bf16], took)
                spent[bf16] += took
    return PrecisionProbe(
        fp32_s=round(best[False], 6),
        bf16_s=round(best[True], 6),
        hidden=hidden,
        intermediate=intermediate,
        threads=threads,
        cpu=cpu_name(),
        measured_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        cost_s=round(time.perf_counter() - started, 3),
    )


def _timed(step: Any, bf16: bool) -> float:
    begin = time.perf_counter()
    step(bf16)
    return time.perf_counter() - begin


def cpu_bf16_isa() -> str | None:
    """The CPU's bf16 instructions as torch sees them (AMX also needs the OS's permission,
    which torch asks for), or, on arm64 Linux, the ``bf16`` feature of /proc/cpuinfo."""
    import torch

    for probe, name in (
        ("_is_amx_tile_supported", "AMX"),
        ("_is_avx512_bf16_supported", "AVX512-BF16"),
    ):
        check = getattr(getattr(torch, "cpu", None), probe, None)
        try:
            if check is not None and check():
                return name
        except (RuntimeError, AttributeError):
            continue
    if platform.machine().lower() in ("aarch64", "arm64"):
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as lines:
                for line in lines:
                    if line.lower().startswith("features") and "bf16" in line.split(":")[1].split():
                        return "Arm BF16"
        except OSError:
            pass
    return None


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as lines:
        for line in lines:
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_facts() -> dict[str, Any]:
    """What a verdict holds for: the CPU, its instruction sets as torch uses them, the torch
    and oneDNN versions."""
    import torch

    onednn = re.search(r"MKL-DNN v([\w.]+)", torch.__config__.show())
    return {
        "cpu": cpu_name(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_isa": cpu_bf16_isa(),
        "torch": torch.__version__,
        "onednn": onednn.group(1) if onednn else None,
    }


def _machine_key(hidden: int, intermediate: int, threads: int) -> str:
    facts = {
        **machine_facts(),
        "threads": threads,
        "shapes": [hidden, intermediate],
        "probe": PROBE_VERSION,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
