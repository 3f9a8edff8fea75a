"""DPO (direct preference optimization) through TRL's ``DPOTrainer``: the chosen answer of
each pair made more likely than the rejected one, measured against a reference model;
``pref_ftx`` adds a supervised loss on the chosen answers (RPO).

``pref_loss`` picks the loss (LLaMA-Factory's name for it): any loss type of the installed
TRL's DPO (sigmoid, the DPO loss, by default; ipo, hinge, robust, ...), or ``simpo`` and
``cpo``, which need no reference model and train through TRL's ``CPOTrainer`` (from
``trl.experimental``; SimPO: length-normalized rewards and a margin, CPO: the sigmoid loss
plus the chosen answers' NLL). A loss TRL does not have is refused in one line that lists
those it has.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from ..training.memory import MemoryProfile
from .preference import PairedMethod, counting, trl_loss_types

if TYPE_CHECKING:
    from ..config import TrainingConfig

#: The reference-free losses, trained with TRL's CPO: pref_loss -> CPOConfig settings.
REFERENCE_FREE = {
    "simpo": {"loss_type": "simpo", "cpo_alpha": 0.0},
    "cpo": {"loss_type": "sigmoid", "cpo_alpha": 1.0},
}


class DPO(PairedMethod):
    name = "dpo"
    title = "DPO"
    description = "Direct preference optimization (TRL): prefer the chosen answer of each pair."
    trainer_name = "DPOTrainer"
    # TRL's DPO scores tokens with its fused LM head and runs the reference model.
    memory = MemoryProfile(sequences_per_sample=2, dropout=False, reference=True, fused_head=True)

    def validate(self, config: TrainingConfig) -> None:
        """A pref_loss the installed TRL has (not checked without TRL)."""
        from ..deps import installed
        from ..errors import ConfigError

        if config.pref_loss in REFERENCE_FREE or config.pref_loss == "sigmoid":
            return
        known = loss_types() if installed("trl") else []
        if known and config.pref_loss not in known:
            raise ConfigError(
                f"pref_loss {config.pref_loss!r} is not a loss of the installed TRL: choose "
                f"{', '.join(known)}, or {' or '.join(REFERENCE_FREE)} (reference-free)."
            )

    def memory_profile(self, config: TrainingConfig) -> MemoryProfile:
        if config.pref_loss in REFERENCE_FREE:  # CPO: both answers together, no reference
            return MemoryProfile(sequences_per_sample=2, dropout=False)
        return self.memory

    def describe(self, config: TrainingConfig) -> list[str]:
        if config.pref_loss not in REFERENCE_FREE:
            return super().describe(config)
        return [
            f"Method: dpo (TRL CPOTrainer, {self.settings_line(config)})",
            f"Reference model: none ({config.pref_loss} is reference-free)",
        ]

    def settings_line(self, config: TrainingConfig) -> str:
        loss = "" if config.pref_loss == "sigmoid" else f"loss {config.pref_loss}, "
        ftx = f", plus {config.pref_ftx:g} x SFT loss" if config.pref_ftx else ""
        return f"{loss}beta {config.pref_beta:g}{ftx}"

    def trainer_classes(self) -> tuple[type, type]:
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer, DPOConfig

    def trainer_classes_for(self, config: TrainingConfig) -> tuple[type, type]:
        if config.pref_loss not in REFERENCE_FREE:
            return self.trainer_classes()
        with warnings.catch_warnings():  # "importing from trl.experimental": known, and said so
            warnings.simplefilter("ignore")
            from trl.experimental.cpo import CPOConfig, CPOTrainer

        return counting(CPOTrainer), CPOConfig

    def trainer_settings(self, config: TrainingConfig) -> dict[str, Any]:
        settings: dict[str, Any] = {"beta": config.pref_beta}
        if config.pref_loss in REFERENCE_FREE:
            return {**settings, **REFERENCE_FREE[config.pref_loss]}
        if config.pref_ftx:  # RPO: DPO plus the chosen answers' NLL
            settings.update(
                loss_type=[config.pref_loss, "sft"], loss_weights=[1.0, config.pref_ftx]
            )
        else:
            settings["loss_type"] = [config.pref_loss]
        return settings


def loss_types() -> list[str]:
    """The loss types of the installed TRL's DPOConfig."""
    from trl import DPOConfig

    return trl_loss_types(DPOConfig, "Possible values are")
