"""Preference tuning (DPO, ORPO, KTO) through TRL's trainers, on the LoRA recipe.

``PreferenceTrainer`` is ``LoRATrainer`` with its data and trainer steps changed:
``prepare_data`` reads preference data (data/preference.py) and ``build_trainer`` builds TRL's
``DPOTrainer``, ``KTOTrainer`` or (from ``trl.experimental``) ``ORPOTrainer`` around the same
model, arguments and callbacks. Everything else is the supervised recipe, a later stage
continuing the task's adapter (``config.init_adapter``) included: model loading and
quantization, the runtime policy, progress reports, checkpoints and resume, the run lock,
Ctrl-C and cancel, TensorBoard, the loss plot and the meta. The loss is TRL's; nothing here
computes one.

The reference model of DPO and KTO is never a second copy of the weights. A fresh adapter
starts as a no-op, so the reference is the base model with the adapter disabled. A stage
that continues an adapter (supervised tuning, then DPO) keeps that adapter as it was before
the stage, frozen, as a second LoRA adapter on the same base weights (TRL's "ref" adapter):
the reference is the model the stage started from. ORPO needs no reference.

TRL is an optional dependency (``pip install 'sage-finetune-plugin[preference]'``), checked
when the trainer is created and imported when TRL's trainer is built.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

from ..config import PREFERENCE_METHODS, TrainingConfig
from ..data.preference import PreparedPreferences, prepare_preferences
from ..data.preparation import quiet_progress
from ..deps import require_optional
from ..errors import DataError
from ..paths import PREFERENCE_CACHE
from .recipe import LoRATrainer

if TYPE_CHECKING:
    from transformers import Trainer

logger = logging.getLogger(__name__)

#: TRL's logged metric -> the meta's name for it (train; evaluation adds ``eval_``).
REWARD_METRICS = {
    "rewards/margins": "margin",
    "rewards/accuracies": "accuracy",
    "rewards/chosen": "chosen",
    "rewards/rejected": "rejected",
}
#: Name of the frozen copy of a continued adapter that TRL adds as the reference.
REFERENCE_ADAPTER = "ref"


class PreferenceTrainer(LoRATrainer):
    """Train a LoRA adapter with DPO, ORPO or KTO (``config.method``) through TRL."""

    METHODS = PREFERENCE_METHODS

    def __init__(self, config: TrainingConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        require_optional("trl")  # before any model is loaded

    def prepare_data(self) -> PreparedPreferences:
        """Preference data rendered through the chat template, split and cached."""
        if not self.config.data_path:
            raise DataError("No preference data: set data_path in the training config.")
        data = prepare_preferences(
            self.config.data_path,
            self.tokenizer,
            self.config,
            cache_dir=self.task_dir / PREFERENCE_CACHE,
        )
        logger.info("Data: %s", data.stats.summary().replace("\n", "; "))
        return data

    def build_trainer(self, model: Any, data: PreparedPreferences) -> Trainer:
        """TRL's trainer for the method, with this plugin's arguments and callbacks."""
        method, config = self.config.method, self.config
        trainer_class, arguments_class = _trl_classes(method)
        extra: dict[str, Any] = {
            "max_length": config.max_length,
            "beta": config.pref_beta,
            "group_by_length": False,  # the rows are text: TRL tokenizes them
        }
        if method == "dpo" and config.pref_ftx:  # RPO: DPO plus the chosen answers' NLL
            extra.update(loss_type=["sigmoid", "sft"], loss_weights=[1.0, config.pref_ftx])
        if method == "kto":
            extra.update(
                desirable_weight=config.kto_desirable_weight,
                undesirable_weight=config.kto_undesirable_weight,
                # The KL term pairs each answer with its batch neighbours' prompts.
                train_sampling_strategy="sequential",
            )
        with quiet_progress(len(data.train)):  # TRL tokenizes the rendered text
            trainer = trainer_class(
                model=model,
                args=self.training_arguments(data, arguments_class, **extra),
                train_dataset=data.train,
                eval_dataset=data.eval,
                processing_class=self.tokenizer,
            )
        peft_model = trainer.accelerator.unwrap_model(trainer.model)
        if not config.init_adapter and REFERENCE_ADAPTER in getattr(peft_model, "peft_config", {}):
            # A fresh adapter: TRL copied it as the reference, but disabling it gives the same
            # model (the base) without the copy.
            peft_model.delete_adapter(REFERENCE_ADAPTER)
        self.install_callbacks(trainer)
        return trainer

    def save(self, trainer: Trainer) -> Any:
        """The trained adapter alone (not the frozen reference copy) in ``<task>/adapter``."""
        model = trainer.accelerator.unwrap_model(trainer.model)
        if REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
            model.delete_adapter(REFERENCE_ADAPTER)
        return super().save(trainer)

    def objective_metrics(self, state: Any) -> dict[str, Any]:
        """The last reward margin, accuracy and chosen/rejected rewards (train and eval), and
        their histories."""
        metrics: dict[str, Any] = {"method": self.config.method}
        for prefix in ("", "eval_"):
            history = [
                {
                    "step": entry["step"],
                    **{
                        name: entry.get(f"{prefix}{key}")
                        for key, name in REWARD_METRICS.items()
                        if entry.get(f"{prefix}{key}") is not None
                    },
                }
                for entry in state.log_history
                if f"{prefix}rewards/margins" in entry
            ]
            last = history[-1] if history else {}
            metrics[f"{prefix}reward_history"] = history
            metrics[f"{prefix}reward_margin"] = last.get("margin")
            metrics[f"{prefix}reward_accuracy"] = last.get("accuracy")
            metrics[f"{prefix}chosen_reward"] = last.get("chosen")
            metrics[f"{prefix}rejected_reward"] = last.get("rejected")
        return metrics


def _trl_classes(method: str) -> tuple[type, type]:
    """TRL's trainer and config classes for ``method``."""
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer, DPOConfig
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOTrainer, KTOConfig
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
            self.state.num_input_tokens_seen += int(self.accelerator.gather(tokens).sum().item())

    return CountingORPOTrainer, ORPOConfig
