"""Running a model over evaluation samples: the answer-token loss and batched greedy answers.

Both work on token ids (the data layer renders the samples) and sort samples by length so a
batch carries little padding; results come back in the samples' order. ``on_batch`` is called
with the number of samples each finished batch held (progress reporting).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..data.rendering import IGNORE_INDEX

OnBatch = Callable[[int], None]


@dataclass
class Answer:
    """A generated answer: its text, its length in tokens (up to the stop token) and whether
    it ran to the token limit without stopping."""

    text: str
    tokens: int
    hit_limit: bool


def answer_losses(
    model: Any,
    rows: Sequence[Mapping[str, Sequence[int]]],
    collate: Callable[[list[Mapping[str, Any]]], Mapping[str, Any]],
    *,
    batch_size: int,
    on_batch: OnBatch | None = None,
) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, token count) of each row's labelled tokens (labels
    -100 are ignored, as in training; ``collate`` pads a batch as training's collator does)."""
    import torch

    results: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    for chunk in _batches(rows, lambda row: len(row["input_ids"]), batch_size):
        batch = collate([rows[i] for i in chunk])
        labels = batch["labels"].to(model.device)
        with torch.inference_mode():
            logits = model(
                input_ids=batch["input_ids"].to(model.device),
                attention_mask=batch["attention_mask"].to(model.device),
            ).logits
        targets = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2),
            targets,
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )
        counts = (targets != IGNORE_INDEX).sum(dim=1)
        for i, total, count in zip(chunk, nll.sum(dim=1).tolist(), counts.tolist(), strict=True):
            results[i] = (float(total), int(count))
        del logits, nll
        if on_batch:
            on_batch(len(chunk))
    return results


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    batch_size: int,
    on_batch: OnBatch | None = None,
    temperature: float | None = None,
) -> list[Answer]:
    """Greedy answers to token-id prompts (``temperature``: sampled), in batches padded on the
    left, each cut at its first stop token."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    stops = set(stop_ids)
    answers: list[Answer | None] = [None] * len(prompts)
    for chunk in _batches(prompts, len, batch_size):
        longest = max(len(prompts[i]) for i in chunk)
        input_ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), longest), dtype=torch.long)
        for row, i in enumerate(chunk):
            prompt = prompts[i]
            input_ids[row, longest - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
            attention_mask[row, longest - len(prompt) :] = 1
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=attention_mask.to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=temperature is not None,
                temperature=temperature,
                top_p=None,
                top_k=None,
                eos_token_id=list(stop_ids),
                pad_token_id=pad_id,
            )
        for row, i in enumerate(chunk):
            new = output[row, longest:].tolist()
            end = next((n for n, token in enumerate(new) if token in stops), None)
            tokens = new if end is None else new[:end]
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            answers[i] = Answer(text, len(tokens), hit_limit=end is None)
        if on_batch:
            on_batch(len(chunk))
    return [answer for answer in answers if answer is not None]


def _batches(items: Sequence[Any], length: Callable[[Any], int], size: int) -> list[list[int]]:
    """Positions of ``items``, longest first, in batches of ``size``."""
    order = sorted(range(len(items)), key=lambda i: length(items[i]), reverse=True)
    return [order[start : start + size] for start in range(0, len(order), size)]
