"""Ways to adapt a model as units: LoRA (QLoRA is LoRA on a quantized base; DoRA, rsLoRA, PiSSA,
OLoRA, LoftQ and LoRA+ are its settings), full and freeze fine-tuning (the model's own weights).

An adapter (``adapters.base.Adapter``) declares in one place how it is attached to a loaded
model, what is trainable, its memory terms, how it is saved, applied to the base model again
and merged into it. The recipe, the memory estimate, merge, chat, eval and export ask the
task's adapter and never test its kind. Imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..registry import Registry

if TYPE_CHECKING:
    from .base import Adapter

REGISTRY: Registry[Adapter] = Registry(
    "adapter",
    {
        "lora": "sage_finetune_plugin.adapters.lora:LoRA",
        "full": "sage_finetune_plugin.adapters.full:Full",
        "freeze": "sage_finetune_plugin.adapters.full:Freeze",
    },
)

#: The kind of a task whose config names none (every task before ``finetuning_type``).
DEFAULT = "lora"


def adapter_for(config: Any = None) -> Adapter:
    """The adapter a training config (or a meta's ``training`` dict) uses: its
    ``finetuning_type``."""
    if isinstance(config, Mapping):
        name = config.get("finetuning_type")
    else:
        name = getattr(config, "finetuning_type", None)
    return REGISTRY.get(name or DEFAULT)
