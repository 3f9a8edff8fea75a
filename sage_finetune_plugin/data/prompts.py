"""The records of reinforcement learning (GRPO): prompts without answers, scored by rewards.

A record holds a ``prompt`` (a string, or a list of messages ending with a user turn, TRL's
conversational form; an optional ``system`` string leads) and any other columns, such as a
reference ``answer`` or ``tests``. Those columns reach the reward functions as keyword
arguments (TRL's convention), one list per column. The normalized row has ``kind`` "prompt",
the prompt as ``messages`` and the other columns as a JSON object in ``extra``; ``tools``, when
given, is also offered to the model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .messages import Invalid, json_value, message, normalize_message, text_field, tools_field

#: The keys a prompt record reads itself; every other column goes to the rewards.
PROMPT_KEYS = ("prompt", "system")
#: Keys that make a record another format's (an answer to learn from), not a prompt to score.
ANSWER_KEYS = ("completion", "chosen", "rejected", "output", "messages", "conversations")


def prompt_claim(record: Mapping[str, Any]) -> str | None:
    """For a method that trains on prompts: a ``prompt`` without answers to learn from."""
    if "prompt" in record and not any(key in record for key in ANSWER_KEYS):
        return "a 'prompt' without answers"
    return None


def normalize_prompt(record: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    value = json_value(record.get("prompt"))
    system = text_field(record, "system", required=False)
    if isinstance(value, list) and value:
        messages = [normalize_message(turn, n, columns) for n, turn in enumerate(value, 1)]
        if messages[-1]["role"] != "user":
            raise Invalid(
                "prompt not ending with a user turn",
                f"the prompt must end with a user message, not {messages[-1]['role']}",
            )
    else:
        messages = [message("user", text_field(record, "prompt"))]
    if system.strip() and messages[0]["role"] != "system":
        messages.insert(0, message("system", system))
    extra = {key: value for key, value in record.items() if key not in PROMPT_KEYS}
    try:
        encoded = json.dumps(extra, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise Invalid("malformed column", f"a column is not JSON data: {exc}") from None
    return {"kind": "prompt", "messages": messages, "tools": tools_field(record), "extra": encoded}


def canonical_prompt(row: Mapping[str, Any]) -> dict[str, Any]:
    """A normalized prompt row back as a prompt record (its columns after the prompt)."""
    messages = [
        {"role": m["role"], "content": m["content"], **json.loads(m.get("extra") or "{}")}
        for m in row["messages"]
    ]
    prompt: Any = messages
    if len(messages) == 1 and set(messages[0]) == {"role", "content"}:
        prompt = messages[0]["content"]
    return {"prompt": prompt, **json.loads(row.get("extra") or "{}")}


def row_columns(row: Mapping[str, Any]) -> dict[str, Any]:
    """The columns a prompt row hands to the rewards (its ``tools`` among them, if any)."""
    columns = json.loads(row.get("extra") or "{}")
    if row.get("tools") and "tools" not in columns:
        columns["tools"] = json.loads(row["tools"])
    return columns
