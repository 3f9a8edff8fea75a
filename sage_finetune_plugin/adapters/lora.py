"""LoRA through peft: low-rank update matrices on the linear layers the config names
(``all-linear``: every linear projection of the decoder, the output head excluded). On a base
model loaded in 4 or 8 bits this is QLoRA: the base is prepared with peft's
``prepare_model_for_kbit_training`` (under FSDP the shards stay as they are).

The memory terms (training/memory.py): the adapter's weights, gradients and optimizer states
count ``r x (in + out)`` parameters per adapted layer, all fp32; for the backward pass each
adapted layer saves its rank-sized hidden state and, with dropout, its dropout mask and dropped
input (without dropout, the input once per parent module and input size: q/k/v share one).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoints import ADAPTER_FILES
from ..config import ALL_LINEAR
from ..errors import ConfigError, ModelError, first_line
from .base import Adapter, Linear

if TYPE_CHECKING:
    from ..config import TrainingConfig

logger = logging.getLogger(__name__)


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

    def attach(self, model: Any, config: TrainingConfig) -> tuple[Any, list[str]]:
        from peft import LoraConfig, get_peft_model

        lora = config.lora
        peft_config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
            target_modules=lora.target_modules,
            bias=lora.bias,
            task_type=lora.task_type,
        )
        try:
            model = get_peft_model(model, peft_config)
        except ValueError as exc:
            raise ConfigError(f"Cannot attach LoRA to {config.model_name}: {exc}") from None
        targets = _module_names(model.peft_config["default"].target_modules)
        trainable, total = model.get_nb_trainable_parameters()
        logger.info(
            "LoRA r=%d alpha=%d on %s: %s trainable parameters of %s (%.2f%%)",
            lora.r,
            lora.lora_alpha,
            ", ".join(targets),
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
        settings = {"r": lora.r, "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout}
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

    def save(self, model: Any, folder: Path) -> None:
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

    def trainable_parameters(self, layers: Sequence[Linear], config: TrainingConfig) -> int:
        return sum(config.lora.r * (layer.in_features + layer.out_features) for layer in layers)

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
        if dropout and config.lora.lora_dropout > 0:
            return total + sum(layer.in_features * (element + mask_element) for layer in layers)
        inputs = {(layer.parent, layer.in_features) for layer in layers}
        return total + sum(size for _, size in inputs) * element

    # --- after training -----------------------------------------------------------------------

    def apply(self, model: Any, path: Path) -> Any:
        from peft import PeftModel

        from ..models import quiet_deprecations

        with quiet_deprecations():
            return PeftModel.from_pretrained(model, path).eval()

    def merge(self, model: Any, *, safe: bool = True) -> Any:
        return model.merge_and_unload(safe_merge=safe)


def _module_names(targets: Any) -> list[str]:
    """peft's resolved target modules as sorted module names (``q_proj``, ...)."""
    return sorted({name.rsplit(".", 1)[-1] for name in targets})
