"""The records of supervised fine-tuning: alpaca, qa, conversation, prompt/completion, text.

Each normalizer turns one record (its columns already renamed, see ``formats.map_columns``) into
a normalized row (see ``formats``): ``kind`` "chat" (alpaca, qa, conversation), "completion"
(prompt/completion) or "text", the ``messages``, the ``context`` that goes with the last user
turn and the ``tools`` offered. What a record means is kept: alpaca ``history`` pairs become
earlier turns, a record-level ``system`` opens the conversation, text-only content part lists
are joined, tool calls and tool results stay tool calls and tool results.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .messages import (
    Invalid,
    history_pairs,
    json_value,
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
    return chat_row(
        text_field(record, "prompt"), text_field(record, "completion"), kind="completion"
    )


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
    # Turns after the last answer teach nothing (they carry no trainable tokens).
    return {"kind": "chat", "messages": messages[: last_answer + 1], "tools": tools_field(record)}
