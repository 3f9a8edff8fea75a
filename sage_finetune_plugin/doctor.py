"""What this machine offers for training (``sage finetune doctor``): the versions of the
training stack, the device, the CPU and the precision a run gets on it, and, on request, the
precision probe measured again (training/precision.py)."""

from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .config import SMALL_MODEL, TrainingConfig

if TYPE_CHECKING:
    from .training.precision import PrecisionProbe

#: The packages whose versions the report names.
STACK = ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "trl")


@dataclass
class MachineReport:
    """The facts ``doctor`` shows."""

    versions: dict[str, str | None]
    device: str
    cpu: dict[str, Any]
    threads: int
    precision: str
    precision_reason: str
    #: The probe's figures: measured now (``bench``) or found in the cache.
    probe: PrecisionProbe | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["probe"] = self.probe.to_dict() if self.probe else None
        return data


def machine_report(
    model: str | None = None, *, bench: bool = False, threads: int | None = None
) -> MachineReport:
    """This machine as a run of ``model`` (the cpu preset's by default) on ``threads`` threads
    sees it; ``bench`` measures the precision probe again, even on a CPU whose runs do not
    consult it (no bf16 instructions)."""
    import torch

    from .errors import FinetuneError
    from .models import model_config
    from .training.precision import DEFAULT_SHAPES, cpu_precision, machine_facts, probe_shapes
    from .training.runtime import Hardware, measured_hardware, resolve_runtime

    config = TrainingConfig(model_name=model or SMALL_MODEL, num_threads=threads)
    threads = threads or torch.get_num_threads()
    hardware = Hardware.detect()
    notes: list[str] = []
    probe = None
    if not hardware.cuda:
        try:
            shapes = probe_shapes(model_config(config.model_name))
        except FinetuneError as exc:
            shapes = DEFAULT_SHAPES
            notes.append(f"probe shapes {shapes} (the model's configuration: {exc})")
        if bench:
            probe = cpu_precision(*shapes, threads=threads, refresh=True)
        if hardware.cpu_bf16_isa is not None:
            hardware = measured_hardware(config, hardware)
            probe = hardware.cpu_probe
    runtime = resolve_runtime(config, hardware)
    versions: dict[str, str | None] = {
        "sage-finetune-plugin": __version__,
        "python": platform.python_version(),
    }
    versions.update((name, _version(name)) for name in STACK)
    return MachineReport(
        versions=versions,
        device=runtime.device,
        cpu=machine_facts(),
        threads=threads,
        precision=runtime.dtype_name,
        precision_reason=runtime.precision_reason,
        probe=probe,
        notes=notes,
    )


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
