"""Rewards of a model's completions to prompts (GRPO): sampled groups for the dry run's check
of the reward functions, greedy answers for an evaluation. torch and transformers are
imported inside the functions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .inference import Answer, generate_answers

if TYPE_CHECKING:
    from ..config import TrainingConfig
    from ..rewards import Reward

#: Prompts generated for at once.
BATCH = 8


def score(
    rewards: Sequence[Reward], rows: Sequence[Mapping[str, Any]], completions: Sequence[str]
) -> dict[str, list[float]]:
    """Each reward of each completion (``rows``: the GRPO rows the completions answer, with
    their prompt, columns and location)."""
    prompts = [row["prompt"] for row in rows]
    columns = [row["columns"] for row in rows]
    locations = [row["location"] for row in rows]
    return {
        reward.name: reward(prompts, list(completions), columns=columns, location=locations)
        for reward in rewards
    }


def complete(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int,
    temperature: float | None = None,
    batch_size: int = BATCH,
) -> list[Answer]:
    """One completion per row's prompt (greedy, or sampled at ``temperature``), tokenized as
    TRL does (the tokenizer adds the BOS)."""
    from ..templates import stop_token_ids

    ids = [tokenizer(row["prompt"])["input_ids"] for row in rows]
    return generate_answers(
        model,
        tokenizer,
        ids,
        stop_ids=stop_token_ids(tokenizer, model.generation_config),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        temperature=temperature,
    )


def check_on_model(
    model: Any, tokenizer: Any, config: TrainingConfig, rewards: Sequence[Reward], rows: Any
) -> None:
    """Call the rewards once on a group of completions the training model samples for the
    first prompt, before the first step: a reward that fails stops the run before it trains."""
    import torch

    group = [dict(rows[0]) for _ in range(config.grpo_num_generations)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            completions = complete(
                model,
                tokenizer,
                group,
                max_new_tokens=min(config.grpo_max_completion_length, 16),
                temperature=config.grpo_temperature,
            )
    finally:
        model.train(was_training)
    score(rewards, group, [answer.text for answer in completions])


def sample_and_score(
    config: TrainingConfig, rewards: Sequence[Reward], rows: Sequence[Mapping[str, Any]]
) -> tuple[dict[str, list[float]], int]:
    """The rewards of ``grpo_num_generations`` sampled completions of each row, by the model a
    run starts from (the base, with ``init_adapter`` for a later stage), on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..models import load_tokenizer, resolve_model

    path = resolve_model(config.model_name, trust_remote_code=config.trust_remote_code)
    tokenizer = load_tokenizer(str(path), trust_remote_code=config.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, trust_remote_code=config.trust_remote_code
    )
    if config.init_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, config.init_adapter)
    model.eval()
    group = [dict(row) for row in rows for _ in range(config.grpo_num_generations)]
    torch.manual_seed(config.seed)
    completions = complete(
        model,
        tokenizer,
        group,
        max_new_tokens=config.grpo_max_completion_length,
        temperature=config.grpo_temperature,
    )
    return score(rewards, group, [answer.text for answer in completions]), len(completions)


def mean_rewards(
    scores: Mapping[str, Sequence[float]], weights: Sequence[float] | None
) -> list[float]:
    """Each completion's weighted sum of its rewards (TRL's sum, a NaN reward left out)."""
    import math

    names = list(scores)
    weights = list(weights or [1.0] * len(names))
    count = len(next(iter(scores.values()), []))
    return [
        sum(
            w * scores[n][i]
            for n, w in zip(names, weights, strict=True)
            if not math.isnan(scores[n][i])
        )
        for i in range(count)
    ]
