"""Full and freeze fine-tuning: the model's own weights train, no adapter.

``full`` trains every weight; ``freeze`` (LLaMA-Factory's freeze tuning) only the decoder layers
``freeze_trainable_layers`` names (the last N; negative: the first N), within them only the
modules ``freeze_trainable_modules`` names (``all``: every one), plus the modules outside the
layers that ``freeze_extra_modules`` names (``embed_tokens``, ``norm``, ...). The weights that
train are held in fp32 while the rest keeps the load precision (bf16 autocast computes in bf16
with fp32 master weights, as mixed precision should). The run saves a whole model, in the load
precision, into ``<task>/model``: there is nothing to merge, and that folder is the model chat,
eval, export and serve use. DPO and KTO are refused: they would need a frozen copy of the whole
model as the reference.

The memory terms (training/memory.py): the trainable weights in fp32, their gradients and
optimizer states; for the backward pass each trained linear layer saves its input (once per
parent module and input size: q/k/v share one), and a freeze run backpropagates only through
the layers from the first trainable one up.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoints import MODEL_FILES
from ..errors import ConfigError, FinetuneError, ModelError, first_line
from ..paths import MODEL_DIR
from .base import Adapter, Linear

if TYPE_CHECKING:
    from ..config import TrainingConfig

logger = logging.getLogger(__name__)

_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


class Full(Adapter):
    name = "full"
    description = "Full fine-tuning: every weight trains; the run saves a whole model."
    weight_files = MODEL_FILES
    folder = MODEL_DIR
    standalone = True
    trains_base_weights = True

    def blockers(self, config: TrainingConfig) -> list[FinetuneError]:
        from ..methods import get_method

        if get_method(config.method).memory.reference:
            return [
                ConfigError(
                    f"method={config.method} with finetuning_type={config.finetuning_type} "
                    "would need a frozen copy of the whole model as its reference: use "
                    "finetuning_type=lora, or method=orpo (no reference model)."
                )
            ]
        return []

    def describe(self, config: TrainingConfig) -> str:
        return "full fine-tuning (every weight)"

    def trains(self, config: TrainingConfig, layers: int) -> Callable[[str], bool]:
        """Whether the parameter of a given name trains, in a model of ``layers`` layers."""
        return lambda name: True

    def prepare(self, model: Any, config: TrainingConfig, *, quantized: bool, fsdp: bool) -> Any:
        import torch

        trains = self.trains(config, _layer_count([n for n, _ in model.named_parameters()]))
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trains(name))
            if trains(name) and parameter.dtype != torch.float32:
                parameter.data = parameter.data.float()  # fp32 master weights
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(
                f"{self.describe(config)} selects no parameter of {config.model_name}: check "
                "freeze_trainable_modules and freeze_extra_modules."
            )
        return model

    def attach(self, model: Any, config: TrainingConfig) -> tuple[Any, list[str]]:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        logger.info(
            "%s: %s trainable parameters of %s (%.2f%%)",
            self.describe(config),
            f"{trainable:,}",
            f"{total:,}",
            100 * trainable / max(total, 1),
        )
        return model, []

    def resume(
        self, model: Any, path: str | Path, config: TrainingConfig
    ) -> tuple[Any, list[str], dict[str, Any]]:
        """A later stage: the weights the task saved, loaded into the base model."""
        try:
            state = _saved_weights(Path(path))
            missing, unexpected = model.load_state_dict(state, strict=False)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ModelError(f"Cannot continue the model in {path}: {first_line(exc)}") from None
        tied = {key for key in missing if key not in state and _is_tied(model, key)}
        if unexpected or set(missing) - tied:
            raise ModelError(
                f"Cannot continue the model in {path}: its weights do not match "
                f"{config.model_name} ({len(unexpected)} unknown, {len(missing)} missing)."
            )
        self.attach(model, config)
        return model, [], {}

    def save(
        self,
        model: Any,
        folder: Path,
        config: TrainingConfig | None = None,
        tokenizer: Any = None,
    ) -> None:
        """The whole model in its load precision, with the end-of-turn tokens as stops."""
        from ..templates import set_generation_stops

        dtype = getattr(model.config, "dtype", None)
        if dtype is not None and not isinstance(dtype, str):
            model.to(dtype)
        if tokenizer is not None:
            set_generation_stops(model, tokenizer)
        model.save_pretrained(folder)

    # --- memory -------------------------------------------------------------------------------

    def adapted_layers(self, linears: Sequence[Linear], config: TrainingConfig) -> list[Linear]:
        """The linear layers that train."""
        trains = self.trains(config, _layer_count([layer.name for layer in linears]))
        return [layer for layer in linears if trains(f"{layer.name}.weight")]

    def trainable_parameters(
        self,
        layers: Sequence[Linear],
        config: TrainingConfig,
        parameters: Sequence[tuple[str, int]] = (),
    ) -> int:
        trains = self.trains(config, _layer_count([name for name, _ in parameters]))
        return sum(size for name, size in parameters if trains(name))

    def saved_bytes_per_token(
        self,
        layers: Sequence[Linear],
        config: TrainingConfig,
        *,
        element: int,
        mask_element: int,
        dropout: bool,
    ) -> int:
        """Each trained linear layer's input, once per parent module and input size."""
        inputs = {(layer.parent, layer.in_features) for layer in layers}
        return sum(size for _, size in inputs) * element

    # --- after training -----------------------------------------------------------------------

    def apply(self, model: Any, path: Path) -> Any:
        raise ModelError(f"{path} holds a whole model, not an adapter: load it as a model.")

    def merge(self, model: Any, *, safe: bool = True) -> Any:
        return model


class Freeze(Full):
    name = "freeze"
    description = (
        "Freeze tuning: only the last N decoder layers train (freeze_trainable_layers; "
        "negative: the first N); the run saves a whole model."
    )

    def describe(self, config: TrainingConfig) -> str:
        count = config.freeze_trainable_layers
        which = f"last {count}" if count > 0 else f"first {-count}"
        modules = config.freeze_trainable_modules
        parts = "" if modules == "all" else f" ({', '.join(modules)})"
        extra = (
            f" + {', '.join(config.freeze_extra_modules)}" if config.freeze_extra_modules else ""
        )
        return f"freeze tuning: the {which} layer(s){parts}{extra}"

    def trains(self, config: TrainingConfig, layers: int) -> Callable[[str], bool]:
        count = config.freeze_trainable_layers
        ids = range(max(0, layers - count), layers) if count > 0 else range(min(-count, layers))
        modules = config.freeze_trainable_modules
        names = [""] if modules == "all" else list(modules)
        prefixes = [f".{i}.{module}" for i in ids for module in names]
        extra = set(config.freeze_extra_modules or ())

        def trains(name: str) -> bool:
            if _LAYER_INDEX.search(name):
                return any(prefix in name for prefix in prefixes)
            return bool(extra.intersection(name.split(".")))

        return trains

    def backward_layers(self, layers: int, config: TrainingConfig) -> int:
        count = config.freeze_trainable_layers
        return min(count, layers) if count > 0 else layers


def _saved_weights(folder: Path) -> dict[str, Any]:
    """The tensors of a saved model folder (one safetensors file or an index of shards)."""
    import json

    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, Any] = {}
    for name in files:
        state.update(load_file(str(folder / name)))
    return state


def _is_tied(model: Any, key: str) -> bool:
    """Whether the parameter ``key`` is the output head tied to the input embeddings."""
    head = model.get_output_embeddings()
    embeddings = model.get_input_embeddings()
    return head is not None and embeddings is not None and head.weight is embeddings.weight


def _layer_count(names: Sequence[str]) -> int:
    """Decoder layers in a model whose parameter (or module) names are ``names``: one more
    than the largest layer index."""
    indices = [int(match.group(1)) for name in names if (match := _LAYER_INDEX.search(name))]
    return max(indices) + 1 if indices else 0
