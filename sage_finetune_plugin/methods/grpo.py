"""GRPO (group relative policy optimization) through TRL's ``GRPOTrainer``: for each prompt the
model samples ``grpo_num_generations`` completions, the reward functions score them, and the
adapter learns to make the completions that scored above their group's mean more likely.

The prompts (data/prompts.py) are rendered through the chat template up to where the answer
starts, as the model sees them at inference; their other columns travel as one JSON column to
the rewards (rewards/), which TRL calls with the prompts, the completions as text and those
columns. ``max_length`` bounds the prompt (a longer one is dropped); the completion adds up to
``grpo_max_completion_length`` tokens. With ``grpo_beta`` > 0 the KL term compares with the
reference: the base model with the adapter disabled (a continued adapter: its frozen copy,
as for DPO). TRL is the optional dependency of the preference methods (``preference`` extra).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..training.memory import MemoryProfile
from .base import STAT_COLUMNS, Method, Preview
from .preference import counting, drop_reference_copy, trl_loss_types

if TYPE_CHECKING:
    from datasets import Features
    from transformers import Trainer

    from ..config import TrainingConfig
    from ..data.prepared import DataStats, PreparedDataset
    from ..data.rendering import Renderer
    from ..training.recipe import LoRATrainer

#: TRL's logged metric -> the meta's name for it (train; evaluation adds ``eval_``).
LOGGED = {
    "reward": "reward",
    "reward_std": "reward_std",
    "completions/mean_length": "completion_length",
    "kl": "kl",
}
_PER_REWARD = re.compile(r"rewards/(.+)/mean$")


class GRPO(Method):
    name = "grpo"
    title = "GRPO"
    description = (
        "Group relative policy optimization (TRL): sample answers to prompts, learn from "
        "their rewards."
    )
    formats = ("prompts",)
    reads = "prompts (a prompt and any other columns, which the rewards read)"
    sample_noun = "prompts"
    answer_tokens = False
    requires = ("trl",)
    needs_bitsandbytes = True  # TRL imports it
    memory = MemoryProfile(dropout=False)
    stage_metrics = ("train_loss", "reward", "completion_length", "eval_reward")

    # --- the config -------------------------------------------------------------------------

    def fit(self, config: TrainingConfig) -> tuple[TrainingConfig, list[str]]:
        """Reward files made absolute; a batch that holds whole groups of completions (TRL
        compares the completions of a prompt within a batch)."""
        from ..rewards import resolve_specs

        config, notes = super().fit(config)
        resolved = resolve_specs(config.rewards)
        if resolved != config.rewards:
            config = config.replace(rewards=resolved)
        group, batch = config.grpo_num_generations, config.per_device_train_batch_size
        if batch % group:
            fitted = group * max(1, round(batch / group))
            notes.append(
                f"grpo samples {group} completions per prompt and trains on whole groups: "
                f"batch {batch} became {fitted} completions"
            )
            config = config.replace(per_device_train_batch_size=fitted)
        return config, notes

    def validate(self, config: TrainingConfig) -> None:
        """Rewards that load; a loss type the installed TRL has (when TRL is installed)."""
        from ..deps import installed
        from ..errors import ConfigError
        from ..rewards import load_rewards

        load_rewards(config.rewards)
        known = loss_types() if installed("trl") else []
        if known and config.grpo_loss_type not in known:
            raise ConfigError(
                f"grpo_loss_type {config.grpo_loss_type!r} is not a loss type of the installed "
                f"TRL's GRPO: choose {', '.join(known)}."
            )

    def describe(self, config: TrainingConfig) -> list[str]:
        weights = config.reward_weights or [1.0] * len(config.rewards)
        rewards = ", ".join(
            f"{_short(spec)}" + (f" x{w:g}" if w != 1 else "")
            for spec, w in zip(config.rewards, weights, strict=False)
        )
        reference = (
            f"Reference model: none (grpo_beta {config.grpo_beta:g}: no KL term)"
            if not config.grpo_beta
            else "Reference model: "
            + (
                "the adapter as it is before this stage, kept frozen"
                if config.init_adapter
                else "the base model with the adapter disabled"
            )
            + f", KL weight {config.grpo_beta:g} (no second copy of the weights)"
        )
        return [
            f"Method: grpo (TRL GRPOTrainer, {config.grpo_num_generations} completions per "
            f"prompt of up to {config.grpo_max_completion_length} tokens, temperature "
            f"{config.grpo_temperature:g}, loss {config.grpo_loss_type})",
            f"Rewards: {rewards or 'none'}",
            reference,
        ]

    def memory_profile(self, config: TrainingConfig) -> MemoryProfile:
        # TRL samples a generation batch (batch x gradient accumulation completions) at once.
        return MemoryProfile(
            dropout=False,
            reference=config.grpo_beta > 0,
            generations=config.per_device_train_batch_size * config.gradient_accumulation_steps,
            completion_length=config.grpo_max_completion_length,
        )

    # --- the data -----------------------------------------------------------------------------

    def features(self) -> Features:
        from datasets import Features, Value

        return Features(
            {
                "prompt": Value("string"),
                "columns": Value("string"),
                "location": Value("string"),
                **{column: Value("int32") for column in STAT_COLUMNS},
            }
        )

    def render(self, renderer: Renderer, rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
        """Each prompt as the model sees it (the chat template up to the answer) and its
        columns for the rewards; a prompt longer than ``max_length`` is dropped."""
        from ..data.prompts import row_columns

        out: dict[str, list[Any]] = {name: [] for name in self.features()}
        prompts = [_prompt_text(renderer, row) for row in rows]
        counts = renderer.token_ids(prompts) if prompts else []
        limit = renderer.max_length or 1 << 30
        for row, prompt, ids in zip(rows, prompts, counts, strict=True):
            length = len(renderer.bos_ids) + len(ids)
            for name, value in (
                ("prompt", prompt),
                ("columns", _json(row_columns(row))),
                ("location", row["location"]),
                ("_length", min(length, limit)),
                ("_full_length", length),
                ("_trainable", int(length <= limit)),  # kept: the prompt fits
                ("_tokens", min(length, limit)),
            ):
                out[name].append(value)
        return out

    def statistics(self, rendered: Any, train: Any) -> dict[str, Any]:
        lengths = rendered.column("_length").to_pylist()
        return {"prompt_p50": int(statistics.median_high(lengths)), "prompt_max": max(lengths)}

    def stats_lines(self, stats: DataStats) -> list[str]:
        extra = stats.method_stats
        if "prompt_p50" not in extra:
            return []
        return [f"prompt p50 {extra['prompt_p50']}, max {extra['prompt_max']} tokens"]

    def preview(self, renderer: Renderer, rows: Sequence[Mapping[str, Any]]) -> list[Preview]:
        """The prompt as the model sees it; the model writes the rest."""
        return [
            [(_prompt_text(renderer, row), False), ("<sampled, then scored>", True)] for row in rows
        ]

    # --- training -----------------------------------------------------------------------------

    def trainer_settings(self, config: TrainingConfig) -> dict[str, Any]:
        """The fields of TRL's GRPOConfig this plugin sets."""
        return {
            "num_generations": config.grpo_num_generations,
            "max_completion_length": config.grpo_max_completion_length,
            "temperature": config.grpo_temperature,
            "beta": config.grpo_beta,
            "loss_type": config.grpo_loss_type,
            "reward_weights": config.reward_weights,
            "group_by_length": False,  # the rows are prompts: TRL tokenizes them
            "log_completions": False,
            "disable_dropout": True,
        }

    def build_trainer(self, recipe: LoRATrainer, model: Any, data: PreparedDataset) -> Trainer:
        from trl import GRPOConfig, GRPOTrainer

        from ..rewards import load_rewards
        from ..scoring.rewards import check_on_model

        config = recipe.config
        rewards = load_rewards(config.rewards)
        check_on_model(model, recipe.tokenizer, config, rewards, data.train)

        trainer = counting(GRPOTrainer, ("prompt_mask", "completion_mask"))(
            model=model,
            reward_funcs=rewards,
            args=recipe.training_arguments(data, GRPOConfig, **self.trainer_settings(config)),
            train_dataset=data.train,
            eval_dataset=data.eval,
            processing_class=recipe.tokenizer,
        )
        if not config.init_adapter:
            drop_reference_copy(trainer)
        recipe.install_callbacks(trainer)
        return trainer

    def before_save(self, trainer: Trainer) -> None:
        drop_reference_copy(trainer)

    def rehearse(self, config: TrainingConfig, data: PreparedDataset) -> list[str]:
        """The rewards called once on real completions: the base model (with the task's
        adapter, for a later stage) samples the first prompts' groups; a reward that raises
        or returns the wrong thing stops the dry run in one line."""
        from ..rewards import load_rewards
        from ..scoring.rewards import sample_and_score

        rewards = load_rewards(config.rewards)
        rows = data.train.select(range(min(2, len(data.train))))
        scores, count = sample_and_score(config, rewards, rows)
        shown = ", ".join(f"{name} {_mean(values):.2f}" for name, values in scores.items())
        return [f"Rewards on {count} completions of the first prompts (untrained): {shown}"]

    # --- what a run records -----------------------------------------------------------------

    def metrics(self, log_history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The last mean reward (and per reward function), its spread, the completion length
        and the KL (train and eval), and their histories."""
        metrics: dict[str, Any] = {"method": self.name}
        for prefix in ("", "eval_"):
            history = []
            for entry in log_history:
                if f"{prefix}reward" not in entry:
                    continue
                point: dict[str, Any] = {"step": entry["step"]}
                for key, name in LOGGED.items():
                    if entry.get(f"{prefix}{key}") is not None:
                        point[name] = entry[f"{prefix}{key}"]
                per = {
                    match.group(1): value
                    for key, value in entry.items()
                    if key.startswith(prefix) and (match := _PER_REWARD.match(key[len(prefix) :]))
                }
                if per:
                    point["rewards"] = per
                history.append(point)
            last = history[-1] if history else {}
            metrics[f"{prefix}reward_history"] = history
            for name in (*LOGGED.values(), "rewards"):
                metrics[f"{prefix}{name}"] = last.get(name)
        return metrics

    def result_lines(self, metrics: Mapping[str, Any]) -> list[str]:
        if metrics.get("reward") is None:
            return []
        return [f"Rewards (grpo): {reward_summary(metrics)}."]


def reward_summary(metrics: Mapping[str, Any], prefix: str = "") -> str:
    """``mean 0.75 (exact 0.50, regex 1.00), completion 12.3 tokens, kl 0.0010``."""
    per = metrics.get(f"{prefix}rewards") or {}
    parts = [f"mean {metrics[f'{prefix}reward']:.2f}"]
    if per:
        parts[0] += " (" + ", ".join(f"{k} {v:.2f}" for k, v in per.items()) + ")"
    if metrics.get(f"{prefix}completion_length") is not None:
        parts.append(f"completion {metrics[f'{prefix}completion_length']:.1f} tokens")
    if metrics.get(f"{prefix}kl") is not None:
        parts.append(f"kl {metrics[f'{prefix}kl']:.4f}")
    return ", ".join(parts)


def loss_types() -> list[str]:
    """The loss types of the installed TRL's GRPOConfig."""
    from trl import GRPOConfig

    return trl_loss_types(GRPOConfig, "Supported values are")


def _prompt_text(renderer: Renderer, row: Mapping[str, Any]) -> str:
    return renderer.prompt_and_answer(row["messages"], "", row["location"], row.get("tools") or "")[
        0
    ]


def _json(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)


def _short(spec: str) -> str:
    """``builtin:regex=...`` as it is; a file as its name and function."""
    if spec.startswith("builtin:"):
        return spec
    path, _, function = spec.rpartition(":")
    return f"{path.rsplit('/', 1)[-1]}:{function}"


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan
