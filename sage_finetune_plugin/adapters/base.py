"""What an adapter declares: the ``Adapter`` base class every adapter unit subclasses.

Training: ``blockers`` refuses a config the kind cannot train, ``prepare`` readies the loaded
base model (quantized or not), ``attach`` adds a fresh adapter and ``resume`` continues a saved
one (a later stage of a task), both returning the model and the module names adapted;
``configure_trainer`` may set the trainer's optimizer (LoRA+); ``save`` writes the adapter
into ``folder`` of the task. A ``standalone`` kind (full, freeze) saves a whole model instead:
it has nothing to merge, and its saved folder is the model chat, eval, export and serve use.

Memory (training/memory.py): ``adapted_layers`` picks the linear layers it adapts,
``trainable_parameters``, ``saved_bytes_per_token`` and ``saved_bytes`` count what they add,
``trains_base_weights`` says whether the trainable parameters are the model's own (held in
fp32) or added to it, ``backward_layers`` how many decoder layers the backward pass runs
through. After training: ``apply`` loads a saved adapter onto the base model and ``merge``
folds it in (merge, chat, eval, export, serve).

Imports nothing heavy; the methods import what they use.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ..paths import ADAPTER_DIR

if TYPE_CHECKING:
    from ..config import TrainingConfig
    from ..errors import FinetuneError


class Linear(Protocol):
    """A linear layer of the decoder as the memory estimate sees it: its full name, the name
    of the module holding it, and its sizes."""

    @property
    def name(self) -> str: ...
    @property
    def parent(self) -> str: ...
    @property
    def in_features(self) -> int: ...
    @property
    def out_features(self) -> int: ...


class Adapter:
    """An adapter kind. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: Files whose presence makes a saved adapter complete (one of them is enough).
    weight_files: ClassVar[tuple[str, ...]] = ()
    #: The folder of the task the trained result is saved in.
    folder: ClassVar[str] = ADAPTER_DIR
    #: A whole model is saved (no adapter to apply or merge).
    standalone: ClassVar[bool] = False
    #: The trainable parameters are weights of the model (kept in fp32), not added to it.
    trains_base_weights: ClassVar[bool] = False

    def blockers(self, config: TrainingConfig) -> list[FinetuneError]:
        """Why this kind cannot train ``config`` (empty: it can)."""
        return []

    def describe(self, config: TrainingConfig) -> str:
        """One line for the dry run and the logs: the kind and its settings."""
        return self.description

    def configure_trainer(self, trainer: Any, config: TrainingConfig) -> None:
        """Called once the trainer is built, before training (set its optimizer, ...)."""

    def __repr__(self) -> str:
        return f"<adapter {self.name}>"

    def prepare(self, model: Any, config: TrainingConfig, *, quantized: bool, fsdp: bool) -> Any:
        """The loaded base model made ready for training an adapter on it."""
        raise NotImplementedError

    def attach(self, model: Any, config: TrainingConfig) -> tuple[Any, list[str]]:
        """A fresh adapter on ``model``: (the trainable model, the module names adapted)."""
        raise NotImplementedError

    def resume(
        self, model: Any, path: str | Path, config: TrainingConfig
    ) -> tuple[Any, list[str], dict[str, Any]]:
        """The adapter saved in ``path`` on ``model``, trainable: (the model, the module names
        adapted, the config changes that describe it)."""
        raise NotImplementedError

    def save(
        self,
        model: Any,
        folder: Path,
        config: TrainingConfig | None = None,
        tokenizer: Any = None,
    ) -> None:
        """Write what training produced into ``folder`` (the tokenizer is saved beside it)."""
        raise NotImplementedError

    def adapted_layers(self, linears: Sequence[Linear], config: TrainingConfig) -> list[Linear]:
        raise NotImplementedError

    def trainable_parameters(
        self,
        layers: Sequence[Linear],
        config: TrainingConfig,
        parameters: Sequence[tuple[str, int]] = (),
    ) -> int:
        """Parameters trained: ``layers`` are the adapted layers, ``parameters`` every
        parameter of the model as (name, size)."""
        raise NotImplementedError

    def saved_bytes(self, layers: Sequence[Linear], config: TrainingConfig, *, element: int) -> int:
        """Bytes the adapted layers save for the backward pass whatever the tokens (all
        layers; one at a time under gradient checkpointing is the estimate's business)."""
        return 0

    def backward_layers(self, layers: int, config: TrainingConfig) -> int:
        """Decoder layers (of ``layers``) whose activations the backward pass needs."""
        return layers

    def saved_bytes_per_token(
        self,
        layers: Sequence[Linear],
        config: TrainingConfig,
        *,
        element: int,
        mask_element: int,
        dropout: bool,
    ) -> int:
        """Bytes per token the adapted layers save for the backward pass."""
        raise NotImplementedError

    def apply(self, model: Any, path: Path) -> Any:
        """``model`` with the adapter saved in ``path`` applied (not merged), for inference."""
        raise NotImplementedError

    def merge(self, model: Any, *, safe: bool = True) -> Any:
        """A model returned by ``apply`` with the adapter folded into its weights."""
        raise NotImplementedError
