"""The runtime policy: where and how a model runs, decided in one place.

``Hardware`` holds the facts about the machine (detected once with torch, or stated for an
estimate); ``resolve_runtime(config, hardware)`` is a pure function from a training config and
those facts to the device, the precision, the quantization and the optimizer. Training, the
memory estimate, the dry run, chat and merge all ask it, so they always agree.

Rules: CUDA if there is a GPU, else Apple MPS (not for bitsandbytes quantization, which has no
MPS kernels), else the CPU. Precision, unless the config sets ``fp16`` or ``bf16``: bf16 on GPUs
that support it, fp16 on other CUDA GPUs; fp32 on MPS. On a CPU with bf16 instructions (AMX,
AVX512-BF16, Arm BF16) the precision is measured: ``measured_hardware`` adds the verdict of the
precision probe (training/precision.py: fp32 against bf16 autocast on the model's shapes,
cached per machine), and bf16 mixed precision is chosen where it ran at least 10 % faster. No
fixed rule is right everywhere: AVX512-BF16 made a step 1.56x faster on an AMD EPYC (Zen 4) and
1.4x slower on a Xeon whose hypervisor hides AMX. Without a measurement (a stated ``Hardware``)
the old rule stands: bf16 with AMX, fp32 otherwise. A CPU without bf16 instructions trains in
fp32 (bf16 is emulated there: 25x slower on a Zen 3). Paged optimizers page their states
through CUDA unified memory: off CUDA the non-paged twin is used; on MPS, bitsandbytes
optimizers fall back to ``adamw_torch``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config import TrainingConfig
from ..errors import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig

    from .precision import PrecisionProbe

#: Paged optimizers page their states to host memory through CUDA unified memory; elsewhere
#: the non-paged twin does the same job.
UNPAGED = {
    "paged_adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_32bit": "adamw_torch",
    "paged_lion_8bit": "lion_8bit",
    "paged_lion_32bit": "lion_32bit",
    "paged_ademamix_8bit": "ademamix_8bit",
    "paged_ademamix_32bit": "ademamix",
}
#: Optimizers that run bitsandbytes kernels (CUDA and CPU backends, not Apple MPS).
BNB_OPTIMIZERS = {
    *UNPAGED,
    "adamw_bnb_8bit",
    "adamw_8bit",
    "lion_8bit",
    "lion_32bit",
    "ademamix",
    "ademamix_8bit",
    "rmsprop_bnb",
    "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit",
}
#: Optimizers of torch itself (no bitsandbytes kernels).
TORCH_OPTIMIZERS = {"adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop"}

#: Model types whose causal-LM forward is exactly decoder -> lm_head -> cross-entropy, so that
#: training/loss.py may compute their loss on answer tokens only (the memory estimate asks too).
ANSWER_LOSS_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo2", "gemma", "starcoder2"}
)
#: Logits the answer-token loss computes at once: chunk x vocabulary elements (64 MiB in fp32).
LOSS_CHUNK_ELEMENTS = 2**24


@dataclass(frozen=True)
class Hardware:
    """What this machine offers, as far as the runtime policy cares."""

    cuda: bool = False
    cuda_bf16: bool = False
    #: Total memory of the first CUDA device, in bytes.
    cuda_memory: int | None = None
    mps: bool = False
    #: The CPU computes bf16 matrix products faster than fp32 ones (AMX): mixed precision
    #: trains in bf16 there unless the config says otherwise.
    cpu_bf16: bool = False
    #: The CPU's bf16 instructions, fast or not ("AMX", "AVX512-BF16", "Arm BF16"; None
    #: without any), for the reason the runtime gives for its precision.
    cpu_bf16_isa: str | None = None
    #: The precision probe's verdict on this CPU (``measured_hardware``), which decides
    #: between bf16 and fp32 where it is known.
    cpu_probe: PrecisionProbe | None = None

    @staticmethod
    @functools.cache
    def detect() -> Hardware:
        """This machine's hardware (imports torch; detected once per process)."""
        import torch

        cuda = torch.cuda.is_available()
        mps = getattr(torch.backends, "mps", None)
        from .precision import cpu_bf16_isa

        isa = cpu_bf16_isa()
        return Hardware(
            cuda=cuda,
            cuda_bf16=cuda and torch.cuda.is_bf16_supported(),
            cuda_memory=int(torch.cuda.get_device_properties(0).total_memory) if cuda else None,
            mps=bool(mps is not None and mps.is_available()),
            cpu_bf16=isa == "AMX",
            cpu_bf16_isa=isa,
        )

    @staticmethod
    def assumed(device: str) -> Hardware:
        """Stated hardware for a what-if (a GPU preset estimated on a CPU machine): a
        bf16-capable GPU for ``cuda``, Apple silicon for ``mps``, a plain CPU otherwise."""
        if device == "cuda":
            return Hardware(cuda=True, cuda_bf16=True)
        if device == "mps":
            return Hardware(mps=True)
        return Hardware()


@dataclass
class Runtime:
    """Where and how a run trains (or a model runs), as decided by the policy."""

    device: str  # "cuda", "mps" or "cpu"
    fp16: bool
    bf16: bool
    optim: str
    quantization: str | None = None  # "4bit", "8bit" or None
    notes: list[str] = field(default_factory=list)
    #: Why this precision (for the dry run).
    precision_reason: str = ""

    @property
    def dtype_name(self) -> str:
        return "bfloat16" if self.bf16 else "float16" if self.fp16 else "float32"

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype_name)


def resolve_runtime(config: TrainingConfig, hardware: Hardware | None = None) -> Runtime:
    """Device, precision, quantization and optimizer for training ``config`` on ``hardware``
    (this machine, measured, when not given). Raises ConfigError for a precision the device
    lacks."""
    hardware = hardware or measured_hardware(config)
    notes: list[str] = []
    device = _device(config, hardware)
    if device == "cpu" and hardware.mps:
        notes.append("bitsandbytes quantization has no Apple MPS kernels: training on the CPU")
    fp16, bf16, reason = _precision(config, device, hardware)
    optim = _optimizer(config.optim, device, notes)
    return Runtime(device, fp16, bf16, optim, config.quantization, notes, reason)


def measured_hardware(config: TrainingConfig, hardware: Hardware | None = None) -> Hardware:
    """``hardware`` (this machine's when not given) with the precision probe's verdict when
    training ``config`` would run on a CPU with bf16 instructions and leaves the precision to
    the policy: read from the cache, or measured once (about a second)."""
    hardware = hardware or Hardware.detect()
    if (
        hardware.cpu_probe is not None
        or hardware.cpu_bf16_isa is None
        or config.bf16 is not None
        or config.fp16
        or _device(config, hardware) != "cpu"
    ):
        return hardware
    from ..errors import FinetuneError
    from ..models import model_config
    from .precision import DEFAULT_SHAPES, cpu_precision, probe_shapes

    try:
        shapes = probe_shapes(model_config(config.model_name))
    except FinetuneError:
        shapes = DEFAULT_SHAPES
    probe = cpu_precision(*shapes, threads=config.num_threads)
    return dataclasses.replace(hardware, cpu_probe=probe)


def _device(config: TrainingConfig, hardware: Hardware) -> str:
    if hardware.cuda:
        return "cuda"
    if hardware.mps and config.quantization is None:
        return "mps"
    return "cpu"


def inference_runtime(hardware: Hardware | None = None) -> Runtime:
    """Where a model answers (chat, evaluation): the GPU in bf16 (fp16 without bf16 support),
    Apple MPS or the CPU in fp32. Never quantized: an adapter is applied to the full model."""
    hardware = hardware or Hardware.detect()
    if hardware.cuda:
        return Runtime("cuda", not hardware.cuda_bf16, hardware.cuda_bf16, optim="")
    return Runtime("mps" if hardware.mps else "cpu", False, False, optim="")


def _precision(config: TrainingConfig, device: str, hardware: Hardware) -> tuple[bool, bool, str]:
    """fp16, bf16 and why."""
    if config.fp16 and device != "cuda":
        raise ConfigError(
            f"fp16 mixed precision needs a CUDA GPU and this run trains on {device}: "
            "unset fp16 (fp32 is chosen) or use bf16."
        )
    bf16_ok = device != "cuda" or hardware.cuda_bf16
    if config.bf16 and not bf16_ok:
        raise ConfigError("This GPU does not support bf16: use fp16, or leave precision unset.")
    if config.fp16 or config.bf16:
        return bool(config.fp16), bool(config.bf16), "set in the config"
    if device == "cuda":
        bf16 = bf16_ok and config.bf16 is None
        fp16 = not bf16 and config.fp16 is None
        reason = (
            "the GPU supports bf16"
            if bf16
            else "the GPU lacks bf16"
            if fp16
            else "fp16 and bf16 off in the config"
        )
        return fp16, bf16, reason
    if device == "mps":
        return False, False, "Apple MPS trains in fp32"
    isa = hardware.cpu_bf16_isa
    if config.bf16 is False:
        return False, False, "bf16 off in the config"
    if (probe := hardware.cpu_probe) is not None:
        undo = "bf16=false for fp32" if probe.bf16 else "bf16=true to use it anyway"
        return False, probe.bf16, f"{probe.reason()}; {undo}"
    if hardware.cpu_bf16:
        return False, True, f"the CPU has {isa or 'fast bf16'}; bf16=false for fp32"
    if isa is None:
        return False, False, "the CPU has no bf16 instructions"
    return False, False, f"the CPU has {isa}, not measured; bf16=true to use it anyway"


def _optimizer(name: str, device: str, notes: list[str]) -> str:
    if device == "cuda":
        return name
    chosen = UNPAGED.get(name, name)
    if device == "mps" and chosen in BNB_OPTIMIZERS:
        chosen = "adamw_torch"
    if chosen != name:
        notes.append(f"optimizer {name} needs CUDA: using {chosen} on {device}")
    return chosen


def quantization_config(
    config: TrainingConfig, runtime: Runtime, *, fsdp: bool = False
) -> BitsAndBytesConfig | None:
    """The bitsandbytes settings for a 4-bit (QLoRA) or 8-bit base model, or None. Under FSDP
    the 4-bit weights are flattened with the rest, so they must be stored in the run's dtype."""
    if runtime.quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if runtime.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=config.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=runtime.dtype,
        bnb_4bit_quant_storage=runtime.dtype if fsdp else None,
    )
