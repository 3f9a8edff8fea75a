"""Training data formats: recognise a record's format, validate it, normalize it.

Every record becomes one shape (a "normalized row"):

    kind      "chat" (alpaca, qa, conversation), "completion" (prompt/completion) or "text"
    messages  list of {"role", "content", "extra"}; roles system / user / assistant / tool
              (a completion is [user: prompt, assistant: completion]; text is [text: ...]);
              ``extra`` is "" or a JSON object of the message's other keys (``tool_calls`` of an
              assistant turn, ``name`` / ``tool_call_id`` of a tool result)
    context   the alpaca ``input`` / qa ``context`` that goes with the last user turn ("" if none)
    tools     "" or the JSON list of tools offered to the model (OpenAI function schemas)
    location  where the record came from ("data.jsonl: line 12"), for error messages

What a record means is kept: alpaca ``history`` pairs become earlier turns, a record-level
``system`` opens the conversation, text-only content part lists are joined, tool calls and tool
results stay tool calls and tool results. Records that supervised fine-tuning cannot train
without losing part of them (preference pairs, KTO labels, media) are recognised by
``record_kind`` and refused (``Unsupported``), never skipped. A malformed record raises
``Invalid`` with a reason (the category ``--skip-invalid`` counts) and a message;
``canonical_record`` turns a normalized row back into its format's own keys.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, DataError

FORMATS = ("alpaca", "qa", "conversation", "prompt_completion", "text")
#: Formats whose records are conversations: sources in different ones of these can be mixed
#: (they are then written as conversations).
CHAT_FORMATS = ("alpaca", "qa", "conversation")


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
    "model": "assistant",
    "function_call": "assistant",  # ShareGPT: the assistant's tool call, as JSON in the value
    "tool": "tool",
    "observation": "tool",  # ShareGPT: a tool's result
    "function": "tool",  # OpenAI's older name for a tool result
    "ipython": "tool",
}

#: Fields ``columns`` can map to a record's own names (``role`` and ``content`` name the keys
#: inside conversation turns).
COLUMN_FIELDS = (
    "instruction",
    "input",
    "output",
    "system",
    "history",
    "tools",
    "question",
    "answer",
    "context",
    "prompt",
    "completion",
    "text",
    "messages",
    "conversations",
    "role",
    "content",
)

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}")


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


def check_columns(columns: Mapping[str, str] | None) -> dict[str, str]:
    """``columns`` as a dict, or ConfigError naming an unknown field or an empty name."""
    columns = dict(columns or {})
    for field_name, column in columns.items():
        if field_name not in COLUMN_FIELDS:
            raise ConfigError(
                f"Unknown field {field_name!r} in columns: map one of {', '.join(COLUMN_FIELDS)} "
                "(FIELD=YOUR_COLUMN, e.g. output=response)."
            )
        if not isinstance(column, str) or not column.strip():
            raise ConfigError(f"columns: {field_name} needs a column name, got {column!r}.")
    return columns


# --- data that supervised fine-tuning does not train ------------------------------------------

MEDIA_KEYS = ("images", "image", "videos", "video", "audios", "audio")
MEDIA_TAGS = ("<image>", "<video>", "<audio>")
MEDIA_PART_TYPES = frozenset(
    {
        "image",
        "image_url",
        "input_image",
        "audio",
        "audio_url",
        "input_audio",
        "video",
        "video_url",
        "file",
        "input_file",
    }
)
_PAIRS = (("chosen", "rejected"), ("chosen_messages", "rejected_messages"))
#: A boolean ``label`` (TRL) marks KTO data on records with an answer; ``kto_tag``
#: (LLaMA-Factory) always does.
_ANSWER_KEYS = ("completion", "messages", "conversations", "output", "answer", "response")


def record_kind(record: Any) -> str | None:
    """``"preference"``, ``"kto"`` or ``"multimodal"`` for records supervised fine-tuning
    cannot train without dropping part of them; None for everything else."""
    found = _kind(record)
    return found[0] if found else None


def _kind(record: Any) -> tuple[str, str] | None:
    """(kind, what shows it) for ``record_kind``."""
    if not isinstance(record, Mapping):
        return None
    for chosen, rejected in _PAIRS:
        if chosen in record and rejected in record:
            return "preference", f"{chosen!r} and {rejected!r} answers"
    for key in ("messages", "conversations"):
        turns = record.get(key)
        last = turns[-1] if isinstance(turns, list) and turns else None
        if isinstance(last, Mapping) and "chosen" in last and "rejected" in last:
            return "preference", f"the last turn of {key!r} split into chosen and rejected"
    if isinstance(record.get("kto_tag"), bool) or (
        isinstance(record.get("label"), bool) and any(k in record for k in _ANSWER_KEYS)
    ):
        key = "kto_tag" if "kto_tag" in record else "label"
        return "kto", f"answers marked good or bad by a boolean {key!r}"
    for key in MEDIA_KEYS:
        if record.get(key) not in (None, "", [], {}):
            return "multimodal", f"a non-empty {key!r} column"
    media = _media_in(record)
    return ("multimodal", media) if media else None


def _media_in(value: Any, depth: int = 0) -> str | None:
    """A media tag or media content part anywhere inside ``value``, described."""
    if isinstance(value, str):
        tag = next((t for t in MEDIA_TAGS if t in value), None)
        return f"a {tag} tag in the text" if tag else None
    if depth > 8:
        return None
    if isinstance(value, Mapping):
        if value.get("type") in MEDIA_PART_TYPES:
            return f"a content part of type {value['type']!r}"
        items: Any = value.values()
    elif isinstance(value, list | tuple):
        items = value
    else:
        return None
    for item in items:
        found = _media_in(item, depth + 1)
        if found:
            return found
    return None


class Unsupported(Exception):
    """A record of a kind supervised fine-tuning does not train (never skipped)."""

    def __init__(self, kind: str, evidence: str) -> None:
        super().__init__(f"{kind} data ({evidence})")
        self.kind = kind
        self.evidence = evidence

    def message(self, source: str) -> str:
        """One line: the kind of data, why it is refused, and what to use instead."""
        command = f"sage finetune quickstart preference --data {source}"
        if self.kind == "preference":
            return (
                f"this is preference data ({self.evidence}); supervised fine-tuning would train "
                f"on part of each record only. Train it with `{command}` (--method dpo or orpo)"
            )
        if self.kind == "kto":
            return (
                f"this is KTO data ({self.evidence}); supervised fine-tuning would also train "
                f"the answers marked bad. Train it with `{command} --method kto`"
            )
        return (
            f"this is multimodal data ({self.evidence}); this plugin fine-tunes text-only "
            "models, which would learn to describe media they never see. Remove the media "
            "from the records, or use a vision-language fine-tuning tool"
        )


# --- validation -------------------------------------------------------------------------------


class Invalid(Exception):
    """A record is malformed: ``reason`` is the category counted by --skip-invalid;
    ``looks_like`` the format the record has instead of the expected one, if any."""

    def __init__(self, reason: str, detail: str, looks_like: str | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.looks_like = looks_like


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


def _message(role: str, content: str, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    encoded = json.dumps(dict(extra), ensure_ascii=False) if extra else ""
    return {"role": role, "content": content, "extra": encoded}


def _chat_row(
    user: str,
    answer: str,
    *,
    context: str = "",
    system: str = "",
    kind: str = "chat",
    history: Sequence[tuple[str, str]] = (),
    tools: str = "",
) -> dict[str, Any]:
    messages = [_message("system", system)] if system.strip() else []
    for earlier_user, earlier_answer in history:
        messages += [_message("user", earlier_user), _message("assistant", earlier_answer)]
    messages += [_message("user", user), _message("assistant", answer)]
    return {"kind": kind, "messages": messages, "context": context, "tools": tools}


def _history(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Alpaca ``history``: earlier [instruction, answer] pairs, oldest first."""
    value = _json_value(record.get("history"))
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


def _json_value(value: Any) -> Any:
    """A list or object stored as JSON text (CSV cells, some tools' exports) decoded."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        with contextlib.suppress(json.JSONDecodeError):
            return json.loads(value)
    return value


def _tools(record: Mapping[str, Any]) -> str:
    """The record's ``tools`` as a JSON list of OpenAI function schemas ("" if none)."""
    value = _json_value(record.get("tools"))
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
    value = _json_value(value)
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list) or not value:
        raise Invalid("malformed tool call", f"{where}: a tool call must be a JSON object or list")
    calls = []
    for call in value:
        function = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping):
            raise Invalid("malformed tool call", f"{where}: a tool call must be a JSON object")
        name, arguments = function.get("name"), _json_value(function.get("arguments", {}))
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


def _normalize_alpaca(record: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    return _chat_row(
        _text(record, "instruction"),
        _text(record, "output"),
        context=_text(record, "input", required=False),
        system=_text(record, "system", required=False),
        history=_history(record),
        tools=_tools(record),
    )


def _normalize_qa(record: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    return _chat_row(
        _text(record, "question"),
        _text(record, "answer"),
        context=_text(record, "context", required=False),
        system=_text(record, "system", required=False),
    )


def _normalize_prompt_completion(
    record: Mapping[str, Any], columns: Mapping[str, str]
) -> dict[str, Any]:
    return _chat_row(_text(record, "prompt"), _text(record, "completion"), kind="completion")


def _normalize_text(record: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    return {
        "kind": "text",
        "messages": [_message("text", _text(record, "text"))],
        "context": "",
        "tools": "",
    }


def _normalize_conversation(
    record: Mapping[str, Any], columns: Mapping[str, str]
) -> dict[str, Any]:
    key = "messages" if "messages" in record else "conversations"
    turns = _json_value(record.get(key))  # CSV cells hold the list as JSON text
    if turns is None:
        raise Invalid("missing field", f"missing field {key!r}")
    if not isinstance(turns, list):
        raise Invalid(
            "non-list conversation", f"field {key!r} must be a list, got {type(turns).__name__}"
        )
    messages = [normalize_message(turn, number, columns) for number, turn in enumerate(turns, 1)]
    system = _text(record, "system", required=False)
    if system.strip():
        opening = messages[0] if messages else None
        if opening is not None and opening["role"] == "system":
            if opening["content"].strip() != system.strip():
                raise Invalid(
                    "conflicting system",
                    f"the record's 'system' and the system message of {key!r} differ; keep one",
                )
        else:
            messages.insert(0, _message("system", system))
    last_answer = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last_answer < 0:
        raise Invalid("no assistant turn", f"{key!r} has no assistant (or gpt) message")
    # Turns after the last answer teach nothing (they carry no trainable tokens).
    return {
        "kind": "chat",
        "messages": messages[: last_answer + 1],
        "context": "",
        "tools": _tools(record),
    }


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
    if role.lower() not in _ROLES:
        raise Invalid(
            "unknown role",
            f"message {number} has unknown role {role!r} (expected system, user or human, "
            "assistant or gpt, tool or observation, function_call)",
        )
    name = _ROLES[role.lower()]
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
    return _message(name, text, extra)


@dataclass(frozen=True)
class _Format:
    name: str
    markers: tuple[str, ...]  # any of these keys present: the record looks like this format
    expected: str  # for error messages
    normalize: Callable[[Mapping[str, Any], Mapping[str, str]], dict[str, Any]]


# Detection order matters: alpaca exports often carry a rendered "text" column too.
FORMAT_SPECS = (
    _Format(
        "conversation",
        ("messages", "conversations"),
        "messages or conversations (a list of role/content or from/value turns), optional "
        "system and tools",
        _normalize_conversation,
    ),
    _Format(
        "alpaca",
        ("instruction", "output"),
        "instruction, output, optional input, system, history and tools",
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


def map_columns(record: Mapping[str, Any], columns: Mapping[str, str]) -> Mapping[str, Any]:
    """``record`` with its mapped columns under their canonical names. A canonical name that is
    already there stays usable when the mapped column is absent (a task's own data/train.jsonl
    is written in canonical names)."""
    top = {f: c for f, c in columns.items() if f not in ("role", "content") and c in record}
    if not top:
        return record
    renamed = {k: v for k, v in record.items() if k not in top.values()}
    renamed.update({f: record[c] for f, c in top.items()})
    return renamed


class Validator:
    """Checks records one by one against one format (forced, or detected from the first),
    after renaming mapped ``columns`` and filling ``{{KEY}}`` ``placeholders``."""

    def __init__(
        self,
        forced: str | None,
        columns: Mapping[str, str] | None = None,
        placeholders: Mapping[str, str] | None = None,
    ) -> None:
        self.format = forced
        self.forced = forced is not None
        self.first_location: str | None = None
        self.columns = check_columns(columns)
        self.placeholders = {str(k): str(v) for k, v in (placeholders or {}).items()}
        #: Unfilled placeholder names, counted once per record, and the first record holding one.
        self.unfilled: Counter[str] = Counter()
        self.unfilled_records = 0
        self.unfilled_example: str | None = None

    def normalize(self, record: Any, location: str) -> dict[str, Any]:
        if not isinstance(record, Mapping):
            raise Invalid("not an object", f"expected a JSON object, found {json_type(record)}")
        if self.columns:
            record = map_columns(record, self.columns)
        kind = _kind(record)
        if kind is not None:
            raise Unsupported(*kind)
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
                f"expected {self.format} fields ({spec.expected}); found keys {_keys(record)}"
                + (f", which are {found} fields" if found else ""),
                looks_like=found,
            )
        row = SPECS_BY_NAME[self.format].normalize(record, self.columns)
        self._fill(row, location)
        row["location"] = location
        return row

    def _fill(self, row: dict[str, Any], location: str) -> None:
        """Fill known placeholders; count the ones left."""
        left: set[str] = set()

        def fill(text: str) -> str:
            if "{{" not in text:
                return text
            text = _PLACEHOLDER.sub(lambda m: self.placeholders.get(m.group(1), m.group(0)), text)
            left.update(_PLACEHOLDER.findall(text))
            return text

        for message in row["messages"]:
            message["content"] = fill(message["content"])
        row["context"] = fill(row["context"])
        if left:
            self.unfilled.update(left)
            self.unfilled_records += 1
            self.unfilled_example = self.unfilled_example or location

    def _mixed_message(self, record: Mapping[str, Any], found: str | None) -> str:
        spec = SPECS_BY_NAME[self.format or ""]
        looks = f"looks like {found}" if found else "has no known fields"
        return (
            f"record {looks} (keys: {_keys(record)}) but the data is {self.format} "
            f"(detected from {self.first_location}; expected {spec.expected}). "
            "Use one format per file, or force one with --format"
        )

    @staticmethod
    def _unknown_message(record: Mapping[str, Any]) -> str:
        known = "; ".join(f"{s.name}: {s.expected}" for s in FORMAT_SPECS)
        return (
            f"no known training fields (keys: {_keys(record)}). Expected one of: {known}; "
            "map other names with --columns FIELD=COLUMN"
        )


def placeholder_warning(unfilled: Mapping[str, int], records: int, example: str) -> str:
    names = ", ".join("{{" + name + "}}" for name, _ in Counter(unfilled).most_common(5))
    more = f" and {len(unfilled) - 5} more" if len(unfilled) > 5 else ""
    return (
        f"{records} record(s) hold placeholders ({names}{more}; first in {example}) that would "
        "be trained verbatim: fill them with --replace KEY=VALUE"
    )


def combined_format(formats: Mapping[str, str]) -> str:
    """The format of several sources together (``{source: format}``): their common one,
    ``conversation`` for a mix of chat formats; DataError for a mix that cannot be combined."""
    distinct = sorted(set(formats.values()))
    if len(distinct) == 1:
        return distinct[0]
    if all(fmt in CHAT_FORMATS for fmt in distinct):
        return "conversation"
    listed = ", ".join(f"{source} is {fmt}" for source, fmt in formats.items())
    raise DataError(
        f"Cannot train these sources together ({listed}): alpaca, qa and conversation data mix "
        "(as conversations), text and prompt_completion data only with their own kind. Make "
        "separate tasks."
    )


def json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else "a value")


# --- back to records ---------------------------------------------------------------------------


def message_dicts(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The row's messages as chat-template messages (role, content and their extra keys)."""
    out = []
    for message in row["messages"]:
        extra = message.get("extra")
        out.append(
            {"role": message["role"], "content": message["content"], **json.loads(extra or "{}")}
        )
    return out


def with_context(messages: list[dict[str, Any]], context: str) -> list[dict[str, Any]]:
    """The context appended to the last user turn (as a chat template sees it)."""
    if not context.strip():
        return messages
    out = [dict(m) for m in messages]
    last_user = next(m for m in reversed(out) if m["role"] == "user")
    last_user["content"] += "\n\n" + context
    return out


def row_tools(row: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    tools = row.get("tools")
    return json.loads(tools) if tools else None


def canonical_record(fmt: str, row: Mapping[str, Any]) -> dict[str, Any]:
    """A normalized row in the keys of ``fmt`` (what quickstart writes to data/train.jsonl)."""
    messages = message_dicts(row)
    tools = row_tools(row)
    if fmt == "text":
        return {"text": messages[0]["content"]}
    if fmt == "prompt_completion":
        return {"prompt": messages[0]["content"], "completion": messages[1]["content"]}
    if fmt == "conversation":
        record: dict[str, Any] = {"messages": with_context(messages, row.get("context", ""))}
        return {**record, "tools": tools} if tools else record
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    *earlier, user, answer = turns
    keys = ("instruction", "input", "output")
    if fmt == "qa":
        keys = ("question", "context", "answer")
    record = dict(zip(keys, (user["content"], row["context"], answer["content"]), strict=True))
    if system is not None:
        record["system"] = system
    if earlier:
        record["history"] = [
            [earlier[i]["content"], earlier[i + 1]["content"]] for i in range(0, len(earlier), 2)
        ]
    if tools:
        record["tools"] = tools
    return record
