"""DPO (direct preference optimization) through TRL's ``DPOTrainer``: the chosen answer of
each pair made more likely than the rejected one, measured against a reference model;
``pref_ftx`` adds a supervised loss on the chosen answers (RPO)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..training.memory import MemoryProfile
from .preference import PairedMethod

if TYPE_CHECKING:
    from ..config import TrainingConfig


class DPO(PairedMethod):
    name = "dpo"
    title = "DPO"
    description = "Direct preference optimization (TRL): prefer the chosen answer of each pair."
    trainer_name = "DPOTrainer"
    # TRL's DPO scores tokens with its fused LM head and runs the reference model.
    memory = MemoryProfile(sequences_per_sample=2, dropout=False, reference=True, fused_head=True)

    def settings_line(self, config: TrainingConfig) -> str:
        ftx = f", plus {config.pref_ftx:g} x SFT loss" if config.pref_ftx else ""
        return f"beta {config.pref_beta:g}{ftx}"

    def trainer_classes(self) -> tuple[type, type]:
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer, DPOConfig

    def trainer_settings(self, config: TrainingConfig) -> dict[str, Any]:
        settings: dict[str, Any] = {"beta": config.pref_beta}
        if config.pref_ftx:  # RPO: DPO plus the chosen answers' NLL
            settings.update(loss_type=["sigmoid", "sft"], loss_weights=[1.0, config.pref_ftx])
        return settings
