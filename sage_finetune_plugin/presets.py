"""Hardware presets, the automatic choice among them, and applying one to a task's config.

``PresetConfigs.<name>()`` returns a ready-made TrainingConfig for a kind of hardware.
``choose_preset`` picks the largest GPU preset whose memory estimate fits the GPU found (``cpu``
without one); ``apply_preset`` gives a task the hyperparameters of a preset while keeping its
model and data. Nothing heavy is imported at module level: detecting the hardware imports
torch, and the memory estimate transformers, inside the functions that need them.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass

from .config import (
    DEFAULT_MODEL,
    LARGE_MODEL,
    SMALL_MODEL,
    LoRAConfig,
    TrainingConfig,
    task_fields,
)
from .errors import ConfigError, ModelError
from .training.memory import DEFAULT_MARGIN, MemoryEstimate, estimate_memory, fits
from .training.runtime import Hardware

#: GPU presets from the largest to the smallest: ``choose_preset`` takes the first that fits.
GPU_PRESETS = ("a100", "rtx_4090", "rtx_3060", "minimal")


@dataclass(frozen=True)
class PresetInfo:
    name: str
    hardware: str
    claimed_memory: str
    description: str
    #: The longest max_length the preset allows when a new task chooses it from its data
    #: (quickstart); the preset's own max_length when the data cannot be measured.
    longest: int


class PresetConfigs:
    """Ready-made configs for common hardware. Each returns a new TrainingConfig."""

    INFO: typing.ClassVar[dict[str, PresetInfo]] = {
        "minimal": PresetInfo(
            "minimal", "GPU < 8 GB", "~6 GB", "4-bit QLoRA, short samples", longest=512
        ),
        "rtx_3060": PresetInfo(
            "rtx_3060", "12 GB GPU", "~10 GB", "8-bit LoRA, 1.5B coder", longest=1024
        ),
        "rtx_4090": PresetInfo(
            "rtx_4090", "24 GB GPU", "~21 GB", "7B LoRA in 16-bit, 2k context", longest=2048
        ),
        "a100": PresetInfo(
            "a100", "40 GB+ GPU", "~26 GB", "7B bf16 LoRA, 4k context", longest=4096
        ),
        # Packed rows of 4 x 256 tokens: one sample may fill a row of 1024.
        "cpu": PresetInfo(
            "cpu",
            "CPU only",
            "~3 GB RAM",
            "LoRA on the 135M model, precision measured",
            longest=1024,
        ),
    }

    @staticmethod
    def minimal() -> TrainingConfig:
        """GPUs under 8 GB: 4-bit nf4 with double quantization."""
        return TrainingConfig(
            preset="minimal",
            model_name=SMALL_MODEL,
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            max_length=512,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=32,
            gradient_checkpointing=True,
            optim="paged_adamw_8bit",
            lora=LoRAConfig(r=4, lora_alpha=8),
        )

    @staticmethod
    def rtx_3060() -> TrainingConfig:
        """12 GB cards: 8-bit base model, batch 1 x 16."""
        return TrainingConfig(
            preset="rtx_3060",
            model_name=DEFAULT_MODEL,
            load_in_8bit=True,
            max_length=1024,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=16,
            gradient_checkpointing=True,
            optim="paged_adamw_8bit",
            lora=LoRAConfig(r=8, lora_alpha=16),
        )

    @staticmethod
    def rtx_4090() -> TrainingConfig:
        """24 GB cards: the 7B model unquantized in 16-bit, 2k context, effective batch 16.

        The original tool's batch 4 x 4 without gradient checkpointing is predicted to need
        about 100 GiB for a 7B model (estimate_memory); batch 1 x 16 with checkpointing keeps
        the effective batch and fits in about 21 GiB."""
        return TrainingConfig(
            preset="rtx_4090",
            model_name=LARGE_MODEL,
            max_length=2048,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=16,
            gradient_checkpointing=True,
            optim="adamw_torch",
            lora=LoRAConfig(r=8, lora_alpha=16),
        )

    @staticmethod
    def a100() -> TrainingConfig:
        """40 GB and larger cards: bf16, 4k context, effective batch 16.

        As for rtx_4090, the original batch 8 x 2 without checkpointing does not fit a 7B
        model (about 370 GiB predicted); batch 1 x 16 with checkpointing needs about 26 GiB."""
        return TrainingConfig(
            preset="a100",
            model_name=LARGE_MODEL,
            bf16=True,
            fp16=False,
            max_length=4096,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=16,
            gradient_checkpointing=True,
            optim="adamw_torch",
            lora=LoRAConfig(r=8, lora_alpha=16),
        )

    @staticmethod
    def cpu() -> TrainingConfig:
        """No GPU: no quantization, the 135M model, short samples and a short run; precision
        from the runtime policy (bf16 mixed precision on CPUs with AMX, else fp32).

        Packed batches (no padding, random order, so the logged loss is not shaped by
        length-sorted batches), a high LoRA learning rate, no LoRA dropout (a short run needs
        no regularization, and a step without the dropout op is 1.2x faster), 5% of the data
        held out and evaluated before, during and after training: the evaluation loss shows
        what the run gained, and the whole run stays under 10 minutes on two cores."""
        return TrainingConfig(
            preset="cpu",
            model_name=SMALL_MODEL,
            fp16=False,
            max_length=256,
            packing=True,
            eval_ratio=0.05,
            num_train_epochs=1,
            max_steps=40,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=1,
            learning_rate=5e-4,
            warmup_ratio=0.05,
            gradient_checkpointing=False,
            optim="adamw_torch",
            logging_steps=5,
            save_steps=20,
            # No dropout: peft then skips the op (nn.Identity); 1.2x faster on SmolLM2 and the
            # same held-out loss over the preset's 40 steps.
            lora=LoRAConfig(r=16, lora_alpha=32, lora_dropout=0.0),
        )

    @classmethod
    def auto(
        cls, model_name: str | None = None, hardware: Hardware | None = None
    ) -> TrainingConfig:
        """The preset ``choose_preset`` picks for this machine and ``model_name`` (whose memory
        decides which GPU preset fits; each preset's own model when it is not given, or when
        its configuration cannot be found to estimate it)."""
        hardware = hardware or Hardware.detect()
        try:
            name = choose_preset(model_name, hardware)[0] if hardware.cuda else "cpu"
        except ModelError:
            name = choose_preset(None, hardware)[0]
        config = cls.get(name)
        return config.replace(model_name=model_name) if model_name else config

    @classmethod
    def names(cls, include_auto: bool = True) -> list[str]:
        """Preset names, as the CLI accepts them."""
        return [*cls.INFO, "auto"] if include_auto else list(cls.INFO)

    @classmethod
    def get(cls, name: str) -> TrainingConfig:
        """The preset called ``name`` (``auto`` detects the hardware)."""
        if name not in cls.names():
            hint = difflib.get_close_matches(name, cls.names(), n=1)
            suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(
                f"Unknown preset {name!r}: choose one of {', '.join(cls.names())}.{suggestion}"
            )
        return getattr(cls, name)()


def choose_preset(
    model_name: str | None = None,
    hardware: Hardware | None = None,
    *,
    device_memory: int | None = None,
    margin: float = DEFAULT_MARGIN,
) -> tuple[str, MemoryEstimate]:
    """The largest GPU preset whose memory estimate fits the GPU with ``margin``, and that
    estimate; ``cpu`` without a GPU (Apple MPS included: bitsandbytes has no kernels there and
    the cpu preset's fp32, unquantized settings are the ones that run).

    ``model_name`` replaces the presets' own models. ``hardware`` is what the machine has
    (detected when not given); ``device_memory`` (bytes) stands for the GPU's memory. When no
    GPU preset fits, the smallest one is returned (check it with ``training.memory.fits``).
    """
    if device_memory is None:
        hardware = hardware or Hardware.detect()
        if not hardware.cuda or hardware.cuda_memory is None:
            return "cpu", estimate_memory(_preset("cpu", model_name), hardware=hardware)
        device_memory = hardware.cuda_memory
    gpu = Hardware.assumed("cuda")
    estimate = None
    for name in GPU_PRESETS:
        estimate = estimate_memory(_preset(name, model_name), hardware=gpu)
        if fits(estimate, device_memory, margin):
            return name, estimate
    assert estimate is not None
    return GPU_PRESETS[-1], estimate


def apply_preset(config: TrainingConfig, name: str) -> TrainingConfig:
    """The preset's hyperparameters with ``config``'s task-level settings (scope ``TASK``: its
    model, data and objective; ``auto``: the largest preset that fits this machine for that
    model). A max_length of the task's own (chosen from its data by quickstart, or given) is
    kept, within the new preset's ``longest``. A task that trains the model's own weights
    (``finetuning_type`` full or freeze) keeps them unquantized: a preset's 4- or 8-bit loading
    is dropped."""
    if name == "auto":
        name, _ = choose_preset(config.model_name)
    preset = PresetConfigs.get(name)
    kept = {key: getattr(config, key) for key in task_fields()}
    if config.max_length != _preset_length(config.preset):
        kept["max_length"] = min(config.max_length, PresetConfigs.INFO[name].longest)
    if config.finetuning_type != "lora":
        kept.update(load_in_4bit=False, load_in_8bit=False)
    return preset.replace(**kept)


def _preset_length(name: str | None) -> int:
    """The max_length a task of preset ``name`` gets when it does not choose one."""
    if name is None or name not in PresetConfigs.INFO:
        return TrainingConfig().max_length
    return PresetConfigs.get(name).max_length


def _preset(name: str, model_name: str | None) -> TrainingConfig:
    config = PresetConfigs.get(name)
    return config.replace(model_name=model_name) if model_name else config
