"""Training data formats: recognise a record's format, validate it, normalize it.

Every record becomes one shape (a "normalized row"):

    kind      "chat" (alpaca, qa, conversation), "completion" (prompt/completion) or "text"
    messages  list of {"role", "content"}; roles system / user / assistant
              (a completion is [user: prompt, assistant: completion]; text is [text: ...])
    context   the alpaca ``input`` / qa ``context`` that goes with the first user turn ("" if none)
    location  where the record came from ("line 12"), for error messages

A malformed record raises ``Invalid`` with a reason (the category ``--skip-invalid`` counts) and
a message; ``canonical_record`` turns a normalized row back into its format's own keys.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

FORMATS = ("alpaca", "qa", "conversation", "prompt_completion", "text")


_FORMAT_ALIASES = {
    "instruction": "alpaca",
    "chat": "conversation",
    "conversations": "conversation",
    "messages": "conversation",
    "sharegpt": "conversation",
    "completion": "prompt_completion",
    "prompt-completion": "prompt_completion",
}


_ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
}


def resolve_format(name: str | None) -> str | None:
    """The canonical format name for ``name`` (aliases such as ``sharegpt`` accepted)."""
    if name is None:
        return None
    canonical = _FORMAT_ALIASES.get(name.lower(), name.lower())
    if canonical not in FORMATS:
        raise ConfigError(
            f"Unknown data format {name!r}: choose one of {', '.join(FORMATS)} "
            f"(aliases: {', '.join(sorted(_FORMAT_ALIASES))})."
        )
    return canonical


class Invalid(Exception):
    """A record is malformed: ``reason`` is the category counted by --skip-invalid."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _text(record: Mapping[str, Any], key: str, *, required: bool = True) -> str:
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


def _chat_row(
    user: str, answer: str, *, context: str = "", system: str = "", kind: str = "chat"
) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system.strip() else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"kind": kind, "messages": messages, "context": context}


def _normalize_alpaca(record: Mapping[str, Any]) -> dict[str, Any]:
    return _chat_row(
        _text(record, "instruction"),
        _text(record, "output"),
        context=_text(record, "input", required=False),
        system=_text(record, "system", required=False),
    )


def _normalize_qa(record: Mapping[str, Any]) -> dict[str, Any]:
    return _chat_row(
        _text(record, "question"),
        _text(record, "answer"),
        context=_text(record, "context", required=False),
        system=_text(record, "system", required=False),
    )


def _normalize_prompt_completion(record: Mapping[str, Any]) -> dict[str, Any]:
    return _chat_row(_text(record, "prompt"), _text(record, "completion"), kind="completion")


def _normalize_text(record: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "kind": "text",
        "messages": [{"role": "text", "content": _text(record, "text")}],
        "context": "",
    }


def _normalize_conversation(record: Mapping[str, Any]) -> dict[str, Any]:
    key = "messages" if "messages" in record else "conversations"
    turns = record.get(key)
    if isinstance(turns, str):  # CSV cells hold the list as JSON text
        with contextlib.suppress(json.JSONDecodeError):
            turns = json.loads(turns)
    if turns is None:
        raise Invalid("missing field", f"missing field {key!r}")
    if not isinstance(turns, list):
        raise Invalid(
            "non-list conversation", f"field {key!r} must be a list, got {type(turns).__name__}"
        )
    messages = [_normalize_message(turn, number) for number, turn in enumerate(turns, 1)]
    last_answer = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last_answer < 0:
        raise Invalid("no assistant turn", f"{key!r} has no assistant (or gpt) message")
    # Turns after the last answer teach nothing (they carry no trainable tokens).
    return {"kind": "chat", "messages": messages[: last_answer + 1], "context": ""}


def _normalize_message(turn: Any, number: int) -> dict[str, str]:
    if not isinstance(turn, Mapping):
        raise Invalid(
            "malformed message", f"message {number} must be an object, got {type(turn).__name__}"
        )
    role_key, content_key = ("from", "value") if "from" in turn else ("role", "content")
    role, content = turn.get(role_key), turn.get(content_key)
    if role is None or content is None:
        raise Invalid("missing field", f"message {number} needs {role_key!r} and {content_key!r}")
    if not isinstance(role, str):
        raise Invalid("non-string value", f"message {number}: {role_key!r} must be a string")
    if role.lower() not in _ROLES:
        raise Invalid(
            "unknown role",
            f"message {number} has unknown role {role!r} "
            "(expected system, user or human, assistant or gpt)",
        )
    if not isinstance(content, str):
        raise Invalid(
            "non-string value",
            f"message {number}: {content_key!r} must be a string, got {type(content).__name__}",
        )
    if not content.strip():
        raise Invalid("empty field", f"message {number} has empty {content_key!r}")
    return {"role": _ROLES[role.lower()], "content": content}


@dataclass(frozen=True)
class _Format:
    name: str
    markers: tuple[str, ...]  # any of these keys present: the record looks like this format
    expected: str  # for error messages
    normalize: Callable[[Mapping[str, Any]], dict[str, Any]]


# Detection order matters: alpaca exports often carry a rendered "text" column too.
FORMAT_SPECS = (
    _Format(
        "conversation",
        ("messages", "conversations"),
        "messages or conversations (a list of role/content or from/value turns)",
        _normalize_conversation,
    ),
    _Format(
        "alpaca",
        ("instruction", "output"),
        "instruction, output, optional input and system",
        _normalize_alpaca,
    ),
    _Format(
        "qa", ("question", "answer"), "question, answer, optional context and system", _normalize_qa
    ),
    _Format(
        "prompt_completion",
        ("prompt", "completion"),
        "prompt, completion",
        _normalize_prompt_completion,
    ),
    _Format("text", ("text",), "text", _normalize_text),
)


SPECS_BY_NAME = {spec.name: spec for spec in FORMAT_SPECS}


def detect_format(record: Mapping[str, Any]) -> str | None:
    return next((s.name for s in FORMAT_SPECS if any(k in record for k in s.markers)), None)


def _keys(record: Mapping[str, Any]) -> str:
    return ", ".join(sorted(str(k) for k in record)) or "none"


class Validator:
    """Checks records one by one against one format (forced, or detected from the first)."""

    def __init__(self, forced: str | None) -> None:
        self.format = forced
        self.forced = forced is not None
        self.first_location: str | None = None

    def normalize(self, record: Any, location: str) -> dict[str, Any]:
        if not isinstance(record, Mapping):
            raise Invalid("not an object", f"expected a JSON object, found {json_type(record)}")
        found = detect_format(record)
        if self.format is None:
            if found is None:
                raise Invalid("unknown format", self._unknown_message(record))
            self.format, self.first_location = found, location
        elif found != self.format and not self.forced:
            raise Invalid("mixed formats", self._mixed_message(record, found))
        elif not any(k in record for k in SPECS_BY_NAME[self.format].markers):
            spec = SPECS_BY_NAME[self.format]
            raise Invalid(
                "wrong fields",
                f"expected {self.format} fields ({spec.expected}); found keys {_keys(record)}",
            )
        row = SPECS_BY_NAME[self.format].normalize(record)
        row["location"] = location
        return row

    def _mixed_message(self, record: Mapping[str, Any], found: str | None) -> str:
        spec = SPECS_BY_NAME[self.format]
        looks = f"looks like {found}" if found else "has no known fields"
        return (
            f"record {looks} (keys: {_keys(record)}) but the data is {self.format} "
            f"(detected from {self.first_location}; expected {spec.expected}). "
            "Use one format per file, or force one with --format"
        )

    @staticmethod
    def _unknown_message(record: Mapping[str, Any]) -> str:
        known = "; ".join(f"{s.name}: {s.expected}" for s in FORMAT_SPECS)
        return f"no known training fields (keys: {_keys(record)}). Expected one of: {known}"


def json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else "a value")


def canonical_record(fmt: str, row: Mapping[str, Any]) -> dict[str, Any]:
    messages = row["messages"]
    if fmt == "text":
        return {"text": messages[0]["content"]}
    if fmt == "conversation":
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    turns = {m["role"]: m["content"] for m in messages}
    if fmt == "prompt_completion":
        return {"prompt": turns["user"], "completion": turns["assistant"]}
    keys = (
        ("instruction", "input", "output") if fmt == "alpaca" else ("question", "context", "answer")
    )
    record = dict(zip(keys, (turns["user"], row["context"], turns["assistant"]), strict=True))
    if "system" in turns:
        record["system"] = turns["system"]
    return record
