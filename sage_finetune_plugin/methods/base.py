"""What a training method declares: the ``Method`` base class every method unit subclasses.

A method says, in one class: the record formats it trains on (``formats``, see data/formats.py)
and how a normalized record becomes a sample (``render``, ``finish``, ``collator``,
``preview``), its statistics (``statistics``, ``stats_lines``), how it adjusts a config and
what stops a run (``fit``, ``validate``, ``blockers``), its dry-run lines and check
(``describe``, ``rehearse``), its memory profile (``memory``, ``memory_profile``), the
metrics it records (``metrics``, ``stage_metrics``, ``result_lines``) and the trainer it
builds (``build_trainer``, ``before_save``). The data pipeline, the recipe, the memory
estimate and the run service ask the config's method and never test its name.

A third-party method subclasses ``Method`` (or a built-in one, such as ``methods.sft.SFT``)
and registers it in the entry-point group ``sage_finetune.methods``::

    [project.entry-points."sage_finetune.methods"]
    my-method = "my_package.method:MyMethod"

Imports nothing heavy; the hooks import what they use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from ..data.formats import Reader
from ..errors import FinetuneError
from ..training.memory import MemoryProfile

if TYPE_CHECKING:
    from datasets import Dataset, Features
    from transformers import PreTrainedTokenizerBase, Trainer

    from ..config import TrainingConfig
    from ..data.prepared import DataStats, PreparedDataset, PrepareOptions
    from ..data.rendering import Renderer
    from ..training.recipe import LoRATrainer

#: A sample shown as the model sees it: (text, trained on) pieces.
Preview = list[tuple[str, bool]]

#: Columns every rendered dataset carries for the statistics (removed after they are read):
#: the longest sequence of a sample after truncation and before it, its answer tokens within
#: ``max_length`` (0: the sample is dropped) and the tokens it costs per epoch.
STAT_COLUMNS = ("_length", "_full_length", "_trainable", "_tokens")


class Method:
    """A training method. Subclasses set the class attributes and override the hooks."""

    #: The name in configs (``method``), on the command line and in the meta.
    name: ClassVar[str] = ""
    #: What it is called in prose ("supervised fine-tuning").
    title: ClassVar[str] = ""
    #: One line for `sage finetune methods`.
    description: ClassVar[str] = ""
    #: The record formats it trains on, and how to say so in a message.
    formats: ClassVar[tuple[str, ...]] = ()
    reads: ClassVar[str] = ""
    #: What one training sample is ("samples", "pairs", "answers").
    sample_noun: ClassVar[str] = "samples"
    #: Optional packages it needs (keys of deps.OPTIONAL).
    requires: ClassVar[tuple[str, ...]] = ()
    memory: ClassVar[MemoryProfile] = MemoryProfile()
    #: Whether its trainer imports bitsandbytes (so a run may not keep it out).
    needs_bitsandbytes: ClassVar[bool] = False
    #: Whether several samples can share a packed row.
    packing: ClassVar[bool] = False
    #: Whether its samples hold the answer tokens it trains on (not GRPO's prompts, whose
    #: answers the model samples): what the data statistics say of the tokens.
    answer_tokens: ClassVar[bool] = True
    #: Metrics kept in the meta's record of each training stage.
    stage_metrics: ClassVar[tuple[str, ...]] = ("train_loss", "eval_loss")

    @property
    def reader(self) -> Reader:
        """Who reads the records, for the data layer's validator and its messages."""
        return Reader(self.name, self.title or self.name, self.formats, self.reads)

    def __repr__(self) -> str:
        return f"<method {self.name}>"

    # --- the config ---------------------------------------------------------------------------

    def fit(self, config: TrainingConfig) -> tuple[TrainingConfig, list[str]]:
        """``config`` with what this method cannot train with changed, and notes saying what
        changed (the base: no packing unless the method packs)."""
        if config.packing and not self.packing:
            note = f"packing does not apply to {self.name}: batches are padded instead"
            return config.replace(packing=False), [note]
        return config, []

    def blockers(self, config: TrainingConfig) -> list[FinetuneError]:
        """What stops a run of ``config``: by default, a missing optional package."""
        from ..deps import require_optional

        found = []
        for module in self.requires:
            try:
                require_optional(module)
            except FinetuneError as exc:
                found.append(exc)
        try:
            self.validate(config)
        except FinetuneError as exc:
            found.append(exc)
        return found

    def validate(self, config: TrainingConfig) -> None:
        """Raise a FinetuneError for what this method cannot train whatever the machine
        (quickstart calls it before it writes a task; ``blockers`` reports it for a run)."""

    def describe(self, config: TrainingConfig) -> list[str]:
        """The dry run's lines about the method."""
        return [f"Method: {self.name} ({self.title or self.description})"]

    def memory_profile(self, config: TrainingConfig) -> MemoryProfile:
        """How a step of ``config`` uses memory (the memory estimate reads it): by default the
        class's ``memory``; a method whose settings change it (a reference-free loss, the
        generations of GRPO) says so here."""
        return self.memory

    def rehearse(self, config: TrainingConfig, data: PreparedDataset) -> list[str]:
        """The dry run's check of the method on its first samples (``data``, rendered, not
        cached): lines to show, or a FinetuneError that stops the run (by default nothing)."""
        return []

    # --- the data -----------------------------------------------------------------------------

    def cache_fields(self, options: PrepareOptions) -> dict[str, Any]:
        """Settings beyond the shared ones that change what ``render`` produces (they key the
        prepared-data cache)."""
        return {}

    def features(self) -> Features:
        """The columns ``render`` produces (``STAT_COLUMNS`` included)."""
        raise NotImplementedError

    def render(self, renderer: Renderer, rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
        """One rendered row per normalized row, as columns (a ``Dataset.map`` batch)."""
        raise NotImplementedError

    def finish(self, dataset: Dataset, options: PrepareOptions, *, train: bool) -> Dataset:
        """The split as the trainer takes it (after the eval split, which is made on the
        rendered rows): by default unchanged."""
        return dataset

    def statistics(self, rendered: Any, train: Dataset) -> dict[str, Any]:
        """Method-specific statistics (``DataStats.method_stats``) from the rendered rows kept
        (a pyarrow Table) and the finished training split."""
        return {}

    def stats_lines(self, stats: DataStats) -> list[str]:
        """Summary lines for ``method_stats``."""
        return []

    def collator(
        self, tokenizer: PreTrainedTokenizerBase, packing: bool
    ) -> Callable[..., Any] | None:
        """The batch collator (None: the trainer's own)."""
        return None

    def preview(self, renderer: Renderer, rows: Sequence[Mapping[str, Any]]) -> list[Preview]:
        """The rows as the model sees them."""
        raise NotImplementedError

    # --- training -----------------------------------------------------------------------------

    def build_trainer(self, recipe: LoRATrainer, model: Any, data: PreparedDataset) -> Trainer:
        """The ``transformers.Trainer`` (or subclass) that trains ``model`` on ``data``, with
        ``recipe.training_arguments`` and ``recipe.install_callbacks``."""
        raise NotImplementedError

    def before_save(self, trainer: Trainer) -> None:
        """Called before the adapter is saved."""

    def metrics(self, log_history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Metrics beyond the loss for the meta, from the Trainer's log history."""
        return {}

    def result_lines(self, metrics: Mapping[str, Any]) -> list[str]:
        """What a finished run reports beyond steps, loss and speed."""
        return []
