"""ORPO (odds-ratio preference optimization) through TRL's ``ORPOTrainer`` (from
``trl.experimental``): a supervised loss on the chosen answers plus an odds-ratio term
(weighted by ``pref_beta``) against the rejected ones; no reference model."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from .preference import PairedMethod, counting

if TYPE_CHECKING:
    from ..config import TrainingConfig


class ORPO(PairedMethod):
    name = "orpo"
    title = "ORPO"
    description = (
        "Odds-ratio preference optimization (TRL): SFT plus a preference term, no reference."
    )
    trainer_name = "ORPOTrainer"

    def settings_line(self, config: TrainingConfig) -> str:
        return f"lambda {config.pref_beta:g}"

    def trainer_classes(self) -> tuple[type, type]:
        with warnings.catch_warnings():  # "importing from trl.experimental": known, and said so
            warnings.simplefilter("ignore")
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return counting(ORPOTrainer), ORPOConfig
