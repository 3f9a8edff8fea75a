"""KTO (Kahneman-Tversky optimization) through TRL's ``KTOTrainer``: answers labelled desirable
or not, no pairs needed (a pair trains as one desirable and one undesirable answer)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..training.memory import MemoryProfile
from .preference import PreferenceMethod

if TYPE_CHECKING:
    from datasets import Dataset

    from ..config import TrainingConfig
    from ..data.prepared import DataStats, PrepareOptions


class KTO(PreferenceMethod):
    name = "kto"
    title = "KTO"
    description = "Kahneman-Tversky optimization (TRL): answers labelled desirable or not."
    formats = ("kto", "preference")
    reads = "prompts with an answer and a boolean label, or chosen/rejected pairs"
    sample_noun = "answers"
    trainer_name = "KTOTrainer"
    # TRL's KTO scores with its fused head and runs the reference (also for its KL term).
    memory = MemoryProfile(dropout=False, reference=True, fused_head=True)

    def fit(self, config: TrainingConfig) -> tuple[TrainingConfig, list[str]]:
        """At least 2 samples per batch: TRL's KTO estimates its KL term from the other
        answers of a batch."""
        config, notes = super().fit(config)
        batch, accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
        if batch >= 2:
            return config, notes
        halved = max(1, accumulation // 2)
        notes.append(
            f"kto needs at least 2 samples per batch for its KL estimate: batch {batch} x "
            f"{accumulation} became 2 x {halved}"
        )
        config = config.replace(per_device_train_batch_size=2, gradient_accumulation_steps=halved)
        return config, notes

    def settings_line(self, config: TrainingConfig) -> str:
        return f"beta {config.pref_beta:g}"

    def finish(self, dataset: Dataset, options: PrepareOptions, *, train: bool) -> Dataset:
        """One row per answer (prompt, completion, label), in a seeded random order: KTO
        trains in order, and the labels must be mixed."""

        def unpaired(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            out: dict[str, list[Any]] = {"prompt": [], "completion": [], "label": []}
            for prompt, answers, labels in zip(
                batch["prompt"], batch["answers"], batch["labels"], strict=True
            ):
                out["prompt"] += [prompt] * len(answers)
                out["completion"] += answers
                out["label"] += labels
            return out

        rows = dataset.map(unpaired, batched=True, remove_columns=dataset.column_names)
        return rows.shuffle(seed=options.seed).flatten_indices() if train else rows

    def statistics(self, rendered: Any, train: Dataset) -> dict[str, Any]:
        labels = train["label"]
        return {
            **super().statistics(rendered, train),
            "desirable": sum(1 for label in labels if label),
            "undesirable": sum(1 for label in labels if not label),
        }

    def stats_lines(self, stats: DataStats) -> list[str]:
        extra = stats.method_stats
        balance = (
            [f"answers: {extra['desirable']} desirable, {extra['undesirable']} undesirable (train)"]
            if "desirable" in extra
            else []
        )
        return [*balance, *super().stats_lines(stats)]

    def trainer_classes(self) -> tuple[type, type]:
        from trl import KTOConfig, KTOTrainer

        return KTOTrainer, KTOConfig

    def trainer_settings(self, config: TrainingConfig) -> dict[str, Any]:
        return {
            "beta": config.pref_beta,
            "desirable_weight": config.kto_desirable_weight,
            "undesirable_weight": config.kto_undesirable_weight,
            # The KL term pairs each answer with its batch neighbours' prompts.
            "train_sampling_strategy": "sequential",
        }
