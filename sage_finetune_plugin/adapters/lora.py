"""LoRA through peft: low-rank update matrices on the linear layers the config names
(``all-linear``: every linear projection of the decoder, the output head excluded). On a base
model loaded in 4 or 8 bits this is QLoRA: the base is prepared with peft's
``prepare_model_for_kbit_training`` (under FSDP the shards stay as they are).

Its variants are peft's own, settings of ``LoRAConfig``: DoRA (``use_dora``), rsLoRA
(``use_rslora``), the initialisations PiSSA, OLoRA and LoftQ (``init_lora_weights``) and LoRA+
(``loraplus_lr_ratio``: peft's ``create_loraplus_optimizer`` becomes the trainer's optimizer).
PiSSA and OLoRA move the adapter's initial value out of the base weights; the initial adapter
is saved in ``<task>/adapter_init`` and the final adapter converted with it, as peft
recommends (``path_initial_model_for_weight_conversion``), so that it applies to the original
base model (with twice the rank). A checkpoint keeps the unconverted form: loading it runs the
same initialisation on the base first, which peft does from its saved config.

The memory terms (training/memory.py): the adapter's weights, gradients and optimizer states
count ``r x (in + out)`` parameters per adapted layer (DoRA: plus a magnitude per output
feature), all fp32; for the backward pass each adapted layer saves its rank-sized hidden state
and, with dropout, its dropout mask and dropped input (without dropout, the input once per
parent module and input size: q/k/v share one); DoRA saves the base and the low-rank outputs
of each layer too.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoints import ADAPTER_FILES
from ..config import ALL_LINEAR
from ..errors import ConfigError, FinetuneError, ModelError, first_line
from ..paths import ADAPTER_INIT_DIR
from ..training.distributed import is_main_process
from .base import Adapter, Linear

if TYPE_CHECKING:
    from ..config import TrainingConfig

logger = logging.getLogger(__name__)

#: Initialisations that move the adapter's start out of the base weights: the saved adapter is
#: converted to one that applies to the original base.
CONVERTED_INITS = ("pissa", "olora")


class LoRA(Adapter):
    name = "lora"
    description = "LoRA (peft); QLoRA on a base model loaded in 4 or 8 bits."
    weight_files = ADAPTER_FILES

    def prepare(self, model: Any, config: TrainingConfig, *, quantized: bool, fsdp: bool) -> Any:
        if quantized and not fsdp:
            # Its fp32 upcast of the norms would break FSDP's one-dtype flat parameters.
            from peft import prepare_model_for_kbit_training

            return prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=config.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        if config.gradient_checkpointing:
            model.enable_input_require_grads()
        return model

    def blockers(self, config: TrainingConfig) -> list[FinetuneError]:
        lora = config.lora
        found: list[FinetuneError] = []
        if lora.init_lora_weights == "loftq" and not config.load_in_4bit:
            found.append(
                ConfigError(
                    "lora.init_lora_weights=loftq compensates 4-bit quantization: it needs "
                    "load_in_4bit=True (QLoRA); use pissa for an unquantized model."
                )
            )
        elif lora.init_lora_weights == "loftq" and not _cuda():
            found.append(
                ConfigError(
                    "lora.init_lora_weights=loftq runs on CUDA only in peft (it quantizes on "
                    "the GPU): use init_lora_weights=default, or pissa without quantization."
                )
            )
        if _converted(lora.init_lora_weights) and config.quantization is not None:
            found.append(
                ConfigError(
                    f"lora.init_lora_weights={lora.init_lora_weights} changes the base weights, "
                    "which cannot be 4- or 8-bit: drop the quantization, or use loftq."
                )
            )
        if lora.use_dora and config.quantization == "8bit":
            found.append(
                ConfigError(
                    "lora.use_dora=true is not supported by peft on an 8-bit model: use "
                    "load_in_4bit=True or no quantization."
                )
            )
        return found

    def describe(self, config: TrainingConfig) -> str:
        lora = config.lora
        parts = [f"r={lora.r}", f"alpha={lora.lora_alpha}"]
        for flag, word in ((lora.use_dora, "DoRA"), (lora.use_rslora, "rsLoRA")):
            if flag:
                parts.append(word)
        if lora.init_lora_weights != "default":
            parts.append(f"init {lora.init_lora_weights}")
        if lora.loraplus_lr_ratio:
            parts.append(f"LoRA+ ratio {lora.loraplus_lr_ratio:g}")
        kind = "QLoRA" if config.quantization else "LoRA"
        return f"{kind} ({', '.join(parts)}) on {_targets_text(lora.target_modules)}"

    def attach(self, model: Any, config: TrainingConfig) -> tuple[Any, list[str]]:
        from peft import LoraConfig, get_peft_model

        lora = config.lora
        init = lora.init_lora_weights
        peft_config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
            target_modules=lora.target_modules,
            bias=lora.bias,
            task_type=lora.task_type,
            use_dora=lora.use_dora,
            use_rslora=lora.use_rslora,
            init_lora_weights=True if init in ("default", "loftq") else init,
        )
        try:
            with warnings.catch_warnings():  # the adapter is converted when saved
                warnings.filterwarnings("ignore", message=".*changes the base weights")
                model = get_peft_model(model, peft_config)
        except (ValueError, NotImplementedError, TypeError) as exc:
            raise ConfigError(
                f"Cannot attach {self.describe(config)} to {config.model_name}: {first_line(exc)}"
            ) from None
        if init == "loftq":
            _loftq(model, config)
        if _converted(init) and is_main_process():  # rank 0 saves, and converts
            _save_initial(model, Path(config.output_dir) / ADAPTER_INIT_DIR)
        targets = _module_names(model.peft_config["default"].target_modules)
        trainable, total = model.get_nb_trainable_parameters()
        logger.info(
            "%s: %s trainable parameters of %s (%.2f%%)",
            self.describe(config).rpartition(" on ")[0] + f" on {', '.join(targets)}",
            f"{trainable:,}",
            f"{total:,}",
            100 * trainable / max(total, 1),
        )
        return model, targets

    def resume(
        self, model: Any, path: str | Path, config: TrainingConfig
    ) -> tuple[Any, list[str], dict[str, Any]]:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, path, is_trainable=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"Cannot continue the adapter in {path}: {first_line(exc)}") from None
        lora = model.peft_config["default"]
        targets = _module_names(lora.target_modules)
        settings = {
            "r": lora.r,
            "lora_alpha": round(lora.lora_alpha),  # a converted rsLoRA alpha is x sqrt(2)
            "lora_dropout": lora.lora_dropout,
            "use_dora": bool(lora.use_dora),
            "use_rslora": bool(lora.use_rslora),
            # A saved adapter starts from its own weights (a converted PiSSA one included).
            "init_lora_weights": "default",
        }
        trainable, total = model.get_nb_trainable_parameters()
        logger.info(
            "Continuing the adapter %s (LoRA r=%d on %s): %s trainable parameters of %s",
            path,
            lora.r,
            ", ".join(targets),
            f"{trainable:,}",
            f"{total:,}",
        )
        return model, targets, {"lora": {**settings, "target_modules": list(targets)}}

    def configure_trainer(self, trainer: Any, config: TrainingConfig) -> None:
        """LoRA+: peft's optimizer with ``loraplus_lr_ratio`` x the learning rate for the B
        matrices, of the class and settings the trainer would have used."""
        ratio = config.lora.loraplus_lr_ratio
        if not ratio:
            return
        from peft.optimizers import create_loraplus_optimizer
        from transformers import Trainer

        optimizer_class, kwargs = Trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
        kwargs = dict(kwargs)
        kwargs.pop("lr", None)
        kwargs["loraplus_weight_decay"] = trainer.args.weight_decay
        trainer.optimizer = create_loraplus_optimizer(
            model=trainer.model,
            optimizer_cls=optimizer_class,
            lr=trainer.args.learning_rate,
            loraplus_lr_ratio=ratio,
            **kwargs,
        )

    def save(
        self,
        model: Any,
        folder: Path,
        config: TrainingConfig | None = None,
        tokenizer: Any = None,
    ) -> None:
        """The adapter; a PiSSA or OLoRA one converted to apply to the original base model."""
        initial = Path(config.output_dir) / ADAPTER_INIT_DIR if config is not None else None
        converts = config is not None and _converted(config.lora.init_lora_weights)
        if converts and initial is not None and (initial / ADAPTER_FILES[0]).is_file():
            model.save_pretrained(
                folder,
                safe_serialization=True,
                path_initial_model_for_weight_conversion=str(initial),
            )
        else:
            model.save_pretrained(folder, safe_serialization=True)

    # --- memory -------------------------------------------------------------------------------

    def adapted_layers(self, linears: Sequence[Linear], config: TrainingConfig) -> list[Linear]:
        """The linear layers peft adapts for ``target_modules`` (the output head excluded)."""
        targets = config.lora.target_modules
        if targets == ALL_LINEAR:
            return list(linears)
        if isinstance(targets, str):  # peft: a regular expression on the full name
            pattern = re.compile(targets)
            return [layer for layer in linears if pattern.fullmatch(layer.name)]
        wanted = set(targets)
        return [
            layer
            for layer in linears
            if layer.name.rpartition(".")[2] in wanted or layer.name in wanted
        ]

    def trainable_parameters(
        self,
        layers: Sequence[Linear],
        config: TrainingConfig,
        parameters: Sequence[tuple[str, int]] = (),
    ) -> int:
        """``r x (in + out)`` per layer; DoRA adds a magnitude per output feature."""
        magnitude = config.lora.use_dora
        return sum(
            config.lora.r * (layer.in_features + layer.out_features)
            + (layer.out_features if magnitude else 0)
            for layer in layers
        )

    def saved_bytes_per_token(
        self,
        layers: Sequence[Linear],
        config: TrainingConfig,
        *,
        element: int,
        mask_element: int,
        dropout: bool,
    ) -> int:
        """With dropout, each layer's mask and dropped input; without, each input once per
        parent module and input size (q/k/v share one). The attention output projection reads
        the output attention already saved."""
        total = len(layers) * config.lora.r * element
        if config.lora.use_dora:  # the base output and the low-rank output, for the magnitude
            total += sum(2 * layer.out_features * element for layer in layers)
        if dropout and config.lora.lora_dropout > 0:
            return total + sum(layer.in_features * (element + mask_element) for layer in layers)
        inputs = {(layer.parent, layer.in_features) for layer in layers}
        return total + sum(size for _, size in inputs) * element

    def saved_bytes(self, layers: Sequence[Linear], config: TrainingConfig, *, element: int) -> int:
        """DoRA composes each adapted layer's weight (base + low-rank) for the weight norm and
        keeps it for the backward pass."""
        if not config.lora.use_dora:
            return 0
        return sum(layer.in_features * layer.out_features * element for layer in layers)

    # --- after training -----------------------------------------------------------------------

    def apply(self, model: Any, path: Path) -> Any:
        from peft import PeftModel

        from ..models import quiet_deprecations

        with quiet_deprecations():
            return PeftModel.from_pretrained(model, path).eval()

    def merge(self, model: Any, *, safe: bool = True) -> Any:
        return model.merge_and_unload(safe_merge=safe)


def _converted(init: str) -> bool:
    return init.split("_niter_")[0] in CONVERTED_INITS


def _save_initial(model: Any, folder: Path) -> None:
    """The adapter as initialised, for converting the trained one (peft's recipe: saved with
    ``init_lora_weights=True`` so that it loads as a plain LoRA)."""
    from ..paths import atomic_directory

    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    try:
        with atomic_directory(folder, replace=True) as staging:
            model.save_pretrained(staging, safe_serialization=True)
    finally:
        config.init_lora_weights = init


def _loftq(model: Any, config: TrainingConfig) -> None:
    """LoftQ on a 4-bit base (peft's ``replace_lora_weights_loftq``, which reads the original
    weights from the model's safetensors files); refused in one line where peft cannot."""
    from peft import replace_lora_weights_loftq

    folder = Path(getattr(model.get_base_model(), "name_or_path", "") or ".")
    weights = next(
        (
            folder / name
            for name in ("model.safetensors", "model.safetensors.index.json")
            if (folder / name).is_file()
        ),
        None,
    )
    if weights is None:
        raise ConfigError(
            f"lora.init_lora_weights=loftq reads the original weights from safetensors files; "
            f"{config.model_name} has none in {folder}. Use init_lora_weights=default."
        )
    try:
        replace_lora_weights_loftq(model, model_path=str(weights))
    except (
        ValueError,
        RuntimeError,
        NotImplementedError,
        TypeError,
        OSError,
        AssertionError,
    ) as exc:
        raise ConfigError(
            f"lora.init_lora_weights=loftq failed on this device: {first_line(exc)} Use "
            "init_lora_weights=default (or pissa without quantization)."
        ) from None


def _cuda() -> bool:
    from ..training.runtime import Hardware

    return Hardware.detect().cuda


def _targets_text(targets: Any) -> str:
    return targets if isinstance(targets, str) else ", ".join(targets)


def _module_names(targets: Any) -> list[str]:
    """peft's resolved target modules as sorted module names (``q_proj``, ...)."""
    return sorted({name.rsplit(".", 1)[-1] for name in targets})
