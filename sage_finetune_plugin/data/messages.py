"""Record building blocks shared by every data format: one message, tool calls, content parts,
text fields, JSON text cells, and the ``Invalid`` error a malformed record raises.

A normalized message is ``{"role", "content", "extra"}``: roles system / user / assistant /
tool (and ``text`` for plain text samples); ``extra`` is "" or a JSON object of the message's
other keys (``tool_calls`` of an assistant turn, ``name`` / ``tool_call_id`` of a tool result,
and ``weight`` 0 for an assistant turn that is context, not learned: OpenAI's fine-tuning files
mark turns so).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from typing import Any

#: Role names found in the wild -> the normalized role.
ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "function_call": "assistant",  # ShareGPT: the assistant's tool call, as JSON in the value
    "tool": "tool",
    "observation": "tool",  # ShareGPT: a tool's result
    "function": "tool",  # OpenAI's older name for a tool result
    "ipython": "tool",
}


class Invalid(Exception):
    """A record is malformed: ``reason`` is the category counted by --skip-invalid;
    ``looks_like`` the format the record has instead of the expected one, if any."""

    def __init__(self, reason: str, detail: str, looks_like: str | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.looks_like = looks_like


def text_field(record: Mapping[str, Any], key: str, *, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise Invalid("missing field", f"missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise Invalid(
            "non-string value", f"field {key!r} must be a string, got {type(value).__name__}"
        )
    if required and not value.strip():
        raise Invalid("empty field", f"field {key!r} is empty")
    return value


def message(role: str, content: str, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    encoded = json.dumps(dict(extra), ensure_ascii=False) if extra else ""
    return {"role": role, "content": content, "extra": encoded}


def history_pairs(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Alpaca ``history``: earlier [instruction, answer] pairs, oldest first."""
    value = json_value(record.get("history"))
    if value in (None, ""):
        return []
    if not isinstance(value, list):
        raise Invalid("malformed history", "field 'history' must be a list of [user, answer] pairs")
    pairs = []
    for number, pair in enumerate(value, 1):
        if (
            not isinstance(pair, list | tuple)
            or len(pair) != 2
            or not all(isinstance(text, str) and text.strip() for text in pair)
        ):
            raise Invalid(
                "malformed history",
                f"history entry {number} must be a [user, answer] pair of non-empty strings",
            )
        pairs.append((pair[0], pair[1]))
    return pairs


def json_value(value: Any) -> Any:
    """A list or object stored as JSON text (CSV cells, some tools' exports) decoded."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        with contextlib.suppress(json.JSONDecodeError):
            return json.loads(value)
    return value


def tools_field(record: Mapping[str, Any]) -> str:
    """The record's ``tools`` as a JSON list of OpenAI function schemas ("" if none)."""
    value = json_value(record.get("tools"))
    if value in (None, "", []):
        return ""
    if not isinstance(value, list):
        raise Invalid("malformed tools", "field 'tools' must be a list of function schemas")
    tools = []
    for number, tool in enumerate(value, 1):
        if isinstance(tool, Mapping) and isinstance(tool.get("function"), Mapping):
            schema = tool["function"]
        elif isinstance(tool, Mapping):
            schema = tool
        else:
            schema = {}
        if not isinstance(schema.get("name"), str) or not schema["name"].strip():
            raise Invalid("malformed tools", f"tool {number} has no function name")
        tools.append({"type": "function", "function": dict(schema)})
    return json.dumps(tools, ensure_ascii=False)


def _tool_calls(value: Any, number: int) -> list[dict[str, Any]]:
    """Tool calls (OpenAI ``tool_calls``, a ``function_call`` object, or the JSON of a ShareGPT
    ``function_call`` turn) as ``[{"type": "function", "function": {name, arguments}}]``."""
    where = f"message {number}"
    value = json_value(value)
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list) or not value:
        raise Invalid("malformed tool call", f"{where}: a tool call must be a JSON object or list")
    calls = []
    for call in value:
        function = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping):
            raise Invalid("malformed tool call", f"{where}: a tool call must be a JSON object")
        name, arguments = function.get("name"), json_value(function.get("arguments", {}))
        if isinstance(arguments, str) and not arguments.strip():
            arguments = {}
        if not isinstance(name, str) or not name.strip():
            raise Invalid("malformed tool call", f"{where}: a tool call has no function name")
        if not isinstance(arguments, Mapping):
            raise Invalid(
                "malformed tool call", f"{where}: the arguments of {name!r} must be a JSON object"
            )
        entry: dict[str, Any] = {
            "type": "function",
            "function": {"name": name, "arguments": dict(arguments)},
        }
        if isinstance(call, Mapping) and isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        calls.append(entry)
    return calls


def _content(value: Any, number: int, key: str) -> str:
    """A message's content: a string, or a list of text parts joined by newlines."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise Invalid(
            "non-string value",
            f"message {number}: {key!r} must be a string or a list of text parts, "
            f"got {type(value).__name__}",
        )
    texts = []
    for part in value:
        if isinstance(part, str):
            texts.append(part)
            continue
        text = part.get("text", part.get("value")) if isinstance(part, Mapping) else None
        kind = part.get("type", "text") if isinstance(part, Mapping) else None
        if kind != "text" or not isinstance(text, str):
            raise Invalid(
                "non-text content part",
                f"message {number}: content part {kind or type(part).__name__!r} is not text "
                "(expected {'type': 'text', 'text': ...})",
            )
        texts.append(text)
    return "\n".join(texts)


def _turn_keys(turn: Mapping[str, Any], columns: Mapping[str, str]) -> tuple[str, str]:
    mapped_role, mapped_content = columns.get("role", ""), columns.get("content", "")
    role_key = mapped_role if mapped_role in turn else "from" if "from" in turn else "role"
    if mapped_content in turn:
        content_key = mapped_content
    elif "value" in turn and "content" not in turn:
        content_key = "value"
    else:
        content_key = "content"
    return role_key, content_key


def normalize_message(
    turn: Any, number: int, columns: Mapping[str, str] | None = None
) -> dict[str, str]:
    """One conversation turn as ``{role, content, extra}`` (see the module docstring)."""
    if not isinstance(turn, Mapping):
        raise Invalid(
            "malformed message", f"message {number} must be an object, got {type(turn).__name__}"
        )
    role_key, content_key = _turn_keys(turn, columns or {})
    role, content = turn.get(role_key), turn.get(content_key)
    if role is None:
        raise Invalid("missing field", f"message {number} needs {role_key!r} and {content_key!r}")
    if not isinstance(role, str):
        raise Invalid("non-string value", f"message {number}: {role_key!r} must be a string")
    if role.lower() not in ROLES:
        raise Invalid(
            "unknown role",
            f"message {number} has unknown role {role!r} (expected system, user or human, "
            "assistant or gpt, tool or observation, function_call)",
        )
    name = ROLES[role.lower()]
    extra: dict[str, Any] = {}
    if role.lower() == "function_call":  # ShareGPT: the call is the turn's value
        if content is None:
            raise Invalid("missing field", f"message {number} needs {content_key!r}")
        extra["tool_calls"] = _tool_calls(content, number)
        content = ""
    elif name == "assistant" and (turn.get("tool_calls") or turn.get("function_call")):
        extra["tool_calls"] = _tool_calls(turn.get("tool_calls") or turn["function_call"], number)
        content = content if content is not None else ""
    elif name == "tool":
        for key in ("name", "tool_call_id"):
            if isinstance(turn.get(key), str):
                extra[key] = turn[key]
    if content is None:
        raise Invalid("missing field", f"message {number} needs {role_key!r} and {content_key!r}")
    text = _content(content, number, content_key)
    if not text.strip() and not extra.get("tool_calls") and name != "tool":
        raise Invalid("empty field", f"message {number} has empty {content_key!r}")
    if "weight" in turn and _weight(turn["weight"], number) == 0 and name == "assistant":
        extra["weight"] = 0
    return message(name, text, extra)


def _weight(value: Any, number: int) -> int:
    """OpenAI's per-message ``weight``: 1 (learned) or 0 (context only)."""
    if value in (0, 1) and not isinstance(value, float | str):
        return int(value)
    raise Invalid(
        "bad weight", f"message {number}: 'weight' must be 0 (not learned) or 1, got {value!r}"
    )


def learned(turn: Mapping[str, Any]) -> bool:
    """Whether a message (normalized, or as a chat template sees it) is trained on: an
    assistant turn whose weight is not 0."""
    if turn.get("role") != "assistant":
        return False
    if "weight" in turn:
        return turn["weight"] != 0
    extra = turn.get("extra")
    return not (extra and json.loads(extra).get("weight") == 0)


def json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else "a value")


# --- back to records ---------------------------------------------------------------------------
