"""ORPO (odds-ratio preference optimization) through TRL's ``ORPOTrainer`` (from
``trl.experimental``): a supervised loss on the chosen answers plus an odds-ratio term
(weighted by ``pref_beta``) against the rejected ones; no reference model."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from .preference import PairedMethod

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

        class CountingORPOTrainer(ORPOTrainer):
            """ORPO's batches hold chosen_ and rejected_ inputs, not input_ids: count their
            tokens for the tokens/s figure."""

            def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
                import torch

                masks = [inputs[k] for k in ("chosen_attention_mask", "rejected_attention_mask")]
                tokens = torch.as_tensor(sum(int(m.sum()) for m in masks), device=self.args.device)
                self.state.num_input_tokens_seen += int(
                    self.accelerator.gather(tokens).sum().item()
                )

        return CountingORPOTrainer, ORPOConfig
