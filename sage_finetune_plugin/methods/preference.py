"""What DPO, ORPO and KTO share: preference records rendered as TRL's text pairs, trained by
TRL's trainers on the LoRA recipe.

A pair (a prompt with a chosen and a rejected answer) or a labelled answer is rendered through
the model's chat template (``Renderer.prompt_and_answer``: the prompt exactly as the model sees
it at inference, each answer with its end of turn and EOS) into the text columns TRL
tokenizes; the token figures of the statistics are counted here with the same tokenizer. A
prompt that leaves no room for an answer within ``max_length`` is dropped.

The reference model of DPO and KTO is never a second copy of the weights. A fresh adapter
starts as a no-op, so the reference is the base model with the adapter disabled. A stage that
continues an adapter (supervised tuning, then DPO) keeps that adapter as it was before the
stage, frozen, as a second LoRA adapter on the same base weights (TRL's "ref" adapter): the
reference is the model the stage started from. ORPO needs no reference.

TRL is an optional dependency (``pip install 'sage-finetune-plugin[preference]'``): a run is
refused in one line without it (``blockers``) and TRL is imported when the trainer is built.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from ..training.memory import MemoryProfile
from .base import STAT_COLUMNS, Method, Preview

if TYPE_CHECKING:
    from datasets import Dataset, Features
    from transformers import Trainer

    from ..config import TrainingConfig
    from ..data.prepared import DataStats, PreparedDataset, PrepareOptions
    from ..data.rendering import Renderer
    from ..training.recipe import LoRATrainer

#: TRL's logged metric -> the meta's name for it (train; evaluation adds ``eval_``).
REWARD_METRICS = {
    "rewards/margins": "margin",
    "rewards/accuracies": "accuracy",
    "rewards/chosen": "chosen",
    "rewards/rejected": "rejected",
}
#: Name of the frozen copy of a continued adapter that TRL adds as the reference.
REFERENCE_ADAPTER = "ref"
PAIRS = "pairs of a prompt with a chosen and a rejected answer"
#: The attention masks of a paired batch (ORPO, CPO), whose tokens are counted.
PAIR_MASKS = ("chosen_attention_mask", "rejected_attention_mask")


class PreferenceMethod(Method):
    """A preference method through TRL: subclasses name the trainer (``trainer_classes``) and
    its settings (``trainer_settings``)."""

    reads = PAIRS
    sample_noun = "pairs"
    requires = ("trl",)
    needs_bitsandbytes = True  # TRL imports it
    stage_metrics = ("train_loss", "eval_loss", "reward_margin", "reward_accuracy")
    #: TRL's trainer, as the dry run names it.
    trainer_name: ClassVar[str] = ""

    def describe(self, config: TrainingConfig) -> list[str]:
        lines = [f"Method: {self.name} (TRL {self.trainer_name}, {self.settings_line(config)})"]
        if not self.memory_profile(config).reference:
            return [*lines, f"Reference model: none ({self.title} is reference-free)"]
        reference = (
            "the adapter as it is before this stage, kept frozen as a second LoRA adapter on "
            "the same base weights"
            if config.init_adapter
            else "the base model with the adapter disabled"
        )
        return [*lines, f"Reference model: {reference} (no second copy of the weights)"]

    def settings_line(self, config: TrainingConfig) -> str:
        return f"beta {config.pref_beta:g}"

    # --- data ---------------------------------------------------------------------------------

    def features(self) -> Features:
        from datasets import Features, List, Value

        ints = Value("int32")
        return Features(
            {
                "prompt": Value("string"),
                "answers": List(Value("string")),
                "labels": List(Value("bool")),
                **{column: ints for column in STAT_COLUMNS},
                "_prompt_length": ints,
                "_answer_lengths": List(ints),
            }
        )

    def render(self, renderer: Renderer, rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
        """Each record's prompt and answers as text, and their token counts."""
        out: dict[str, list[Any]] = {name: [] for name in self.features()}
        texts: list[str] = []
        rendered = [_texts(renderer, row) for row in rows]
        for prompt, answers, _ in rendered:
            texts += [prompt, *answers]
        counts = iter(len(ids) for ids in renderer.token_ids(texts)) if texts else iter(())
        limit = renderer.max_length or 1 << 30
        for prompt, answers, labels in rendered:
            prompt_length = len(renderer.bos_ids) + next(counts)
            lengths = [next(counts) for _ in answers]
            room = max(0, limit - prompt_length)
            longest = prompt_length + max(lengths)
            for name, value in (
                ("prompt", prompt),
                ("answers", answers),
                ("labels", labels),
                ("_length", min(longest, limit)),
                ("_full_length", longest),
                ("_trainable", sum(min(n, room) for n in lengths)),
                ("_tokens", sum(min(prompt_length + n, limit) for n in lengths)),
                ("_prompt_length", prompt_length),
                ("_answer_lengths", lengths),
            ):
                out[name].append(value)
        return out

    def finish(self, dataset: Dataset, options: PrepareOptions, *, train: bool) -> Dataset:
        """Pairs as TRL's prompt / chosen / rejected columns."""

        def pairs(batch: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
            return {
                "prompt": batch["prompt"],
                "chosen": [answers[0] for answers in batch["answers"]],
                "rejected": [answers[1] for answers in batch["answers"]],
            }

        return dataset.map(pairs, batched=True, remove_columns=dataset.column_names)

    def statistics(self, rendered: Any, train: Dataset) -> dict[str, Any]:
        prompts = rendered.column("_prompt_length").to_pylist()
        answers = [n for lengths in rendered.column("_answer_lengths").to_pylist() for n in lengths]
        return {
            "prompt_p50": int(statistics.median_high(prompts)),
            "prompt_max": max(prompts),
            "answer_p50": int(statistics.median_high(answers)),
            "answer_max": max(answers),
        }

    def stats_lines(self, stats: DataStats) -> list[str]:
        extra = stats.method_stats
        if "prompt_p50" not in extra:
            return []
        return [
            f"prompt p50 {extra['prompt_p50']}, max {extra['prompt_max']}; answer p50 "
            f"{extra['answer_p50']}, max {extra['answer_max']} tokens"
        ]

    def preview(self, renderer: Renderer, rows: Sequence[Mapping[str, Any]]) -> list[Preview]:
        """The prompt (not trained on), then each answer (trained on) with what it is."""
        samples = []
        for row in rows:
            prompt, answers, labels = _texts(renderer, row)
            if row["kind"] == "labelled":
                tag = "desirable" if labels[0] else "undesirable"
                samples.append([(prompt, False), (answers[0], True), (f"  <- {tag}", False)])
            else:
                chosen, rejected = answers
                samples.append(
                    [
                        (prompt, False),
                        (chosen, True),
                        ("  <- chosen; rejected: ", False),
                        (rejected, True),
                    ]
                )
        return samples

    # --- training -----------------------------------------------------------------------------

    def trainer_classes(self) -> tuple[type, type]:
        """TRL's trainer and its config class."""
        raise NotImplementedError

    def trainer_classes_for(self, config: TrainingConfig) -> tuple[type, type]:
        """TRL's trainer and config class for ``config`` (by default ``trainer_classes``; DPO
        trains the reference-free losses with TRL's CPO)."""
        return self.trainer_classes()

    def trainer_settings(self, config: TrainingConfig) -> dict[str, Any]:
        """The method's fields of TRL's config class."""
        return {"beta": config.pref_beta}

    def build_trainer(self, recipe: LoRATrainer, model: Any, data: PreparedDataset) -> Trainer:
        from ..data.preparation import quiet_progress

        config = recipe.config
        trainer_class, arguments_class = self.trainer_classes_for(config)
        extra = {
            "max_length": config.max_length,
            "group_by_length": False,  # the rows are text: TRL tokenizes them
            **self.trainer_settings(config),
        }
        with quiet_progress(len(data.train)):  # TRL tokenizes the rendered text
            trainer = trainer_class(
                model=model,
                args=recipe.training_arguments(data, arguments_class, **extra),
                train_dataset=data.train,
                eval_dataset=data.eval,
                processing_class=recipe.tokenizer,
            )
        if not config.init_adapter:
            drop_reference_copy(trainer)
        recipe.install_callbacks(trainer)
        return trainer

    def before_save(self, trainer: Trainer) -> None:
        """The trained adapter alone is saved, not the frozen reference copy."""
        drop_reference_copy(trainer)

    def metrics(self, log_history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The last reward margin, accuracy and chosen/rejected rewards (train and eval), and
        their histories."""
        metrics: dict[str, Any] = {"method": self.name}
        for prefix in ("", "eval_"):
            history = [
                {
                    "step": entry["step"],
                    **{
                        name: entry[f"{prefix}{key}"]
                        for key, name in REWARD_METRICS.items()
                        if entry.get(f"{prefix}{key}") is not None
                    },
                }
                for entry in log_history
                if f"{prefix}rewards/margins" in entry
            ]
            last = history[-1] if history else {}
            metrics[f"{prefix}reward_history"] = history
            metrics[f"{prefix}reward_margin"] = last.get("margin")
            metrics[f"{prefix}reward_accuracy"] = last.get("accuracy")
            metrics[f"{prefix}chosen_reward"] = last.get("chosen")
            metrics[f"{prefix}rejected_reward"] = last.get("rejected")
        return metrics

    def result_lines(self, metrics: Mapping[str, Any]) -> list[str]:
        if metrics.get("reward_margin") is None:
            return []
        rewards = [f"margin {metrics['reward_margin']:.3f}"]
        for key, label, digits in (
            ("reward_accuracy", "accuracy", 2),
            ("eval_reward_margin", "eval margin", 3),
            ("eval_reward_accuracy", "eval accuracy", 2),
        ):
            if metrics.get(key) is not None:
                rewards.append(f"{label} {metrics[key]:.{digits}f}")
        return [f"Rewards ({self.name}): {', '.join(rewards)}."]


def counting(trainer_class: type, masks: tuple[str, ...] = PAIR_MASKS) -> type:
    """``trainer_class`` (ORPO's, CPO's, GRPO's) counting the tokens of its batches, whose
    inputs are not ``input_ids`` but the attention ``masks`` named, for the tokens/s figure."""

    class Counting(trainer_class):
        def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
            import torch

            found = [inputs[k] for k in masks if k in inputs]
            tokens = torch.as_tensor(sum(int(m.sum()) for m in found), device=self.args.device)
            self.state.num_input_tokens_seen += int(self.accelerator.gather(tokens).sum().item())

    Counting.__name__ = f"Counting{trainer_class.__name__}"
    return Counting


def trl_loss_types(arguments_class: type, lead: str) -> list[str]:
    """The loss types a TRL config class offers, read from its ``loss_type`` help text (the
    quoted names of the sentence that starts with ``lead``)."""
    import dataclasses

    for f in dataclasses.fields(arguments_class):
        if f.name == "loss_type":
            text = str(f.metadata.get("help", ""))
            return re.findall(r"'(\w+)'", text.split(lead, 1)[-1].split(". ", 1)[0])
    return []


def drop_reference_copy(trainer: Trainer) -> None:
    """Delete the frozen copy of the adapter TRL adds as the reference (``"ref"``): before
    saving, and for a fresh adapter at once (disabling it gives the same model, the base,
    without the copy)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REFERENCE_ADAPTER)


class PairedMethod(PreferenceMethod):
    """DPO and ORPO: the chosen and the rejected answer of each pair run together."""

    formats = ("preference",)
    memory = MemoryProfile(sequences_per_sample=2, dropout=False)


def _texts(renderer: Renderer, row: Mapping[str, Any]) -> tuple[str, list[str], list[bool]]:
    """A normalized record as TRL's text: the prompt, its answers, and whether each answer is
    the desirable one."""
    if row["kind"] == "labelled":
        answers, labels = [row["completion"]], [bool(row["label"])]
    else:
        answers, labels = [row["chosen"], row["rejected"]], [True, False]
    tools = row.get("tools") or ""
    pieces = [
        renderer.prompt_and_answer(row["messages"], a, row["location"], tools) for a in answers
    ]
    return pieces[0][0], [answer for _, answer in pieces], labels
