"""Evaluation samples: loaded records as the model trained on them, plus what to ask and expect.

``eval_samples`` renders every record exactly as preparation does (same Renderer, same
truncation, samples without answer tokens dropped, so positions match the prepared data and
``preparation.eval_split`` finds the held-out ones). Each sample keeps its tokens and labels
(for the answer-token loss), the prompt tokens that precede its last answer (the conversation
before the last assistant turn, through the chat template with the generation prompt: what
the model is asked), that answer as the reference, and a readable prompt for reports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .rendering import IGNORE_INDEX, RecordError, Renderer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .loading import LoadedData


@dataclass
class EvalSample:
    """One record to evaluate. ``prompt_ids`` / ``reference`` are None for plain text
    records (nothing to answer: they count for the loss only)."""

    location: str
    prompt: str
    reference: str | None
    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int] | None

    @property
    def answer_tokens(self) -> int:
        """Tokens in the loss (the first one is never predicted)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def eval_samples(
    loaded: LoadedData,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None,
    batch_size: int = 256,
    system_prompt: str | None = None,
    skip_invalid: bool = False,
) -> list[EvalSample]:
    """Every record of ``loaded`` as an EvalSample, in order; records whose answer tokens
    were all truncated away are dropped, as preparation drops them, and with ``skip_invalid``
    those that cannot be rendered as they mean (tools the template cannot show, ...).
    ``system_prompt`` opens conversations without one, as in training and chat."""
    renderer = Renderer(tokenizer, max_length=max_length, system_prompt=system_prompt)
    samples: list[EvalSample] = []
    for start in range(0, len(loaded), batch_size):
        rows = list(loaded.dataset.select(range(start, min(start + batch_size, len(loaded)))))
        for row, (ids, labels, _) in _encoded(renderer, rows, skip_invalid):
            sample = EvalSample(
                location=row["location"],
                prompt=_readable_prompt(row),
                reference=None,
                input_ids=ids,
                labels=labels,
                prompt_ids=None,
            )
            if not sample.answer_tokens:
                continue
            if row["kind"] != "text":
                sample.prompt_ids = _prompt_ids(renderer, row)
                sample.reference = _last_answer(row["messages"])
            samples.append(sample)
    return samples


def _encoded(
    renderer: Renderer, rows: list[dict[str, Any]], skip_invalid: bool
) -> list[tuple[dict[str, Any], tuple[list[int], list[int], int]]]:
    """Each row with its tokens; with ``skip_invalid`` the rows that cannot be rendered left
    out (found one by one when a batch fails)."""
    try:
        return list(zip(rows, renderer.encode(rows), strict=True))
    except RecordError:
        if not skip_invalid:
            raise
    encoded = []
    for row in rows:
        try:
            encoded.append((row, renderer.encode([row])[0]))
        except RecordError:
            continue
    return encoded


def select(samples: Sequence[EvalSample], positions: Sequence[int]) -> list[EvalSample]:
    return [samples[i] for i in positions]


def _prompt_ids(renderer: Renderer, row: Mapping[str, Any]) -> list[int]:
    """The tokens before the last trainable segment (the last answer), tokenized segment by
    segment as the Renderer does, so they equal the training sample's prefix."""
    segments = renderer.segments(row)
    last = max(i for i, (_, trainable) in enumerate(segments) if trainable)
    ids = list(renderer.bos_ids)
    texts = [text for text, _ in segments[:last]]
    if texts:
        for tokens in renderer.token_ids(texts):
            ids += tokens
    return ids


def _last_answer(messages: Sequence[Mapping[str, str]]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "assistant")


def _readable_prompt(row: Mapping[str, Any]) -> str:
    """What the model is asked, for a report: the user's message (and context), or the
    earlier turns as ``role: text`` lines for a longer conversation."""
    messages = list(row["messages"])
    if row["kind"] == "text":
        return ""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    before = messages[:last]
    context = row.get("context") or ""
    if len(before) == 1:
        text = before[0]["content"]
        return f"{text}\n\n{context}" if context.strip() else text
    lines = [f"{m['role']}: {m['content']}" for m in before]
    if context.strip():
        lines.append(f"context: {context}")
    return "\n".join(lines)
