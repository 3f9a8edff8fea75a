"""The records of supervised fine-tuning: alpaca, qa, conversation, prompt/completion, text.

Each normalizer turns one record (its columns already renamed, see ``formats.map_columns``) into
a normalized row (see ``formats``): ``kind`` "chat" (alpaca, qa, conversation), "completion"
(prompt/completion) or "text", the ``messages``, the ``context`` that goes with the last user
turn and the ``tools`` offered. What a record means is kept: alpaca ``history`` pairs become
earlier turns, a record-level ``system`` opens the conversation, text-only content part lists
are joined, tool calls and tool results stay tool calls and tool results.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .messages import (
    Invalid,
    history_pairs,
    json_value,
    learned,
    message,
    normalize_message,
    text_field,
    tools_field,
)


def chat_row(
    user: str,
    answer: str,
    *,
    context: str = "",
    system: str = "",
    kind: str = "chat",
    history: Sequence[tuple[str, str]] = (),
    tools: str = "",
) -> dict[str, Any]:
    messages = [message("system", system)] if system.strip() else []
    for earlier_user, earlier_answer in history:
        messages += [message("user", earlier_user), message("assistant", earlier_answer)]
    messages += [message("user", user), message("assistant", answer)]
    return {"kind": kind, "messages": messages, "context": context, "tools": tools}


def normalize_alpaca(record: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    return chat_row(
        text_field(record, "instruction"),
        text_field(record, "output"),
        context=text_field(record, "input", required=False),
        system=text_field(record, "system", required=False),
        history=history_pairs(record),
        tools=tools_field(record),
    )


def normalize_qa(record: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    return chat_row(
        text_field(record, "question"),
        text_field(record, "answer"),
        context=text_field(record, "context", required=False),
        system=text_field(record, "system", required=False),
    )


def normalize_prompt_completion(
    record: Mapping[str, Any], columns: Mapping[str, str]
) -> dict[str, Any]:
    """Text prompt and completion (the completion learned, the prompt not), or TRL's
    conversational form: ``prompt`` a list of messages, ``completion`` a list with the
    assistant's answer (every assistant turn of the prompt is context, not learned)."""
    prompt, completion = json_value(record.get("prompt")), json_value(record.get("completion"))
    if not isinstance(prompt, list) and not isinstance(completion, list):
        return chat_row(
            text_field(record, "prompt"), text_field(record, "completion"), kind="completion"
        )
    turns = {}
    for key, value in (("prompt", prompt), ("completion", completion)):
        if isinstance(value, str) and value.strip():
            value = [{"role": "user" if key == "prompt" else "assistant", "content": value}]
        if not isinstance(value, list) or not value:
            raise Invalid(
                "malformed message", f"field {key!r} must be a list of messages or a string"
            )
        turns[key] = [normalize_message(turn, n, columns) for n, turn in enumerate(value, 1)]
    context = [_as_context(turn) for turn in turns["prompt"]]
    if context[-1]["role"] != "user":
        raise Invalid(
            "prompt not ending with a user turn",
            f"the prompt must end with a user message, not {context[-1]['role']}",
        )
    if any(turn["role"] == "user" for turn in turns["completion"]):
        raise Invalid("user turn in the completion", "'completion' holds a user message")
    if not any(learned(turn) for turn in turns["completion"]):
        raise Invalid(
            "no assistant turn", "'completion' has no assistant message (with a weight not 0)"
        )
    return {
        "kind": "chat",
        "messages": [*context, *turns["completion"]],
        "tools": tools_field(record),
    }


def _as_context(turn: dict[str, str]) -> dict[str, str]:
    """A prompt's assistant turn: shown to the model, not learned (weight 0)."""
    if turn["role"] != "assistant" or not learned(turn):
        return turn
    extra = {**json.loads(turn["extra"] or "{}"), "weight": 0}
    return {**turn, "extra": json.dumps(extra, ensure_ascii=False)}


def normalize_text(record: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    return {"kind": "text", "messages": [message("text", text_field(record, "text"))]}


def normalize_conversation(record: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    key = "messages" if "messages" in record else "conversations"
    turns = json_value(record.get(key))  # CSV cells hold the list as JSON text
    if turns is None:
        raise Invalid("missing field", f"missing field {key!r}")
    if not isinstance(turns, list):
        raise Invalid(
            "non-list conversation", f"field {key!r} must be a list, got {type(turns).__name__}"
        )
    messages = [normalize_message(turn, number, columns) for number, turn in enumerate(turns, 1)]
    system = text_field(record, "system", required=False)
    if system.strip():
        opening = messages[0] if messages else None
        if opening is not None and opening["role"] == "system":
            if opening["content"].strip() != system.strip():
                raise Invalid(
                    "conflicting system",
                    f"the record's 'system' and the system message of {key!r} differ; keep one",
                )
        else:
            messages.insert(0, message("system", system))
    last_answer = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last_answer < 0:
        raise Invalid("no assistant turn", f"{key!r} has no assistant (or gpt) message")
    last_answer = max((i for i, m in enumerate(messages) if learned(m)), default=-1)
    if last_answer < 0:
        raise Invalid(
            "no learned answer", f"every assistant turn of {key!r} has weight 0: nothing to learn"
        )
    # Turns after the last learned answer teach nothing (they carry no trainable tokens).
    return {"kind": "chat", "messages": messages[: last_answer + 1], "tools": tools_field(record)}
