"""Training data formats: recognise a record's format, validate it, normalize it.

Every record becomes one shape, a "normalized row" (the columns of ``normalized_features``):

    kind        "chat" (alpaca, qa, conversation), "completion" (prompt/completion), "text",
                "pair" (a prompt with a chosen and a rejected answer), "labelled" (a prompt
                with one answer marked desirable or not) or "prompt" (a prompt alone)
    messages    list of {"role", "content", "extra"} (see ``messages``): the conversation, or
                for "pair" and "labelled" rows the prompt
    context     the alpaca ``input`` / qa ``context`` that goes with the last user turn ("" if none)
    tools       "" or the JSON list of tools offered to the model (OpenAI function schemas)
    chosen, rejected, completion, label   the answers of "pair" and "labelled" rows
    extra       "prompt" rows (GRPO): their other columns as a JSON object, for the rewards
    location    where the record came from ("data.jsonl: line 12"), for error messages

The formats are ``FORMAT_SPECS``, in detection order; each training method reads some of them
(``methods``). The ``Validator`` checks records one by one for one method: columns renamed,
``{{KEY}}`` placeholders filled, the format detected from the first record (or forced) and
every other record held to it. A record of a format the method does not train on (preference
pairs for supervised fine-tuning, instructions for DPO) and media are refused (``Unsupported``),
never skipped; a malformed record raises ``Invalid`` with a reason (the category
``skip_invalid`` counts). ``canonical_record`` turns a normalized row back into its format's
own keys.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, DataError
from .messages import Invalid, json_type
from .preference import (
    canonical_preference,
    labelled_claim,
    labelled_evidence,
    normalize_labelled,
    normalize_pair,
    pair_evidence,
)
from .prompts import canonical_prompt, normalize_prompt, prompt_claim
from .supervised import (
    normalize_alpaca,
    normalize_conversation,
    normalize_prompt_completion,
    normalize_qa,
    normalize_text,
)

SUPERVISED = "supervised"
PREFERENCE = "preference"
PROMPTS = "prompts"


def _never(record: Mapping[str, Any]) -> str | None:
    return None


@dataclass(frozen=True)
class Format:
    """One data format: how to recognise its records (``evidence``: what shows it, or None),
    what it expects (for messages), how to normalize a record, its family (supervised or
    preference) and the quickstart task type that reads it."""

    name: str
    evidence: Callable[[Mapping[str, Any]], str | None]
    expected: str
    normalize: Callable[[Mapping[str, Any], Mapping[str, str]], dict[str, Any]]
    family: str
    task_type: str
    #: Why a method of the other family must not train it (said when one is asked to).
    misuse: str = ""
    #: A looser test used when the reading method trains on this format (None: ``evidence``).
    claim: Callable[[Mapping[str, Any]], str | None] | None = None
    #: The top-level fields it reads, the required ones first (for ``columns`` hints).
    fields: tuple[str, ...] = ()
    required: int = 0


def _keys_present(*names: str) -> Callable[[Mapping[str, Any]], str | None]:
    def evidence(record: Mapping[str, Any]) -> str | None:
        present = [name for name in names if name in record]
        return f"keys {', '.join(present)}" if present else None

    return evidence


# Detection order matters: preference records hold prompts and conversations too, KTO records
# prompts and completions, and alpaca exports often carry a rendered "text" column.
FORMAT_SPECS = (
    # Only a method that trains on prompts (grpo) reads a bare prompt as one (before the
    # formats whose fields its other columns may share, such as qa's answer): for the others
    # it stays a record with no answer (unknown format, with a columns hint).
    Format(
        "prompts",
        _never,
        "a prompt (a string or messages) and any other columns, which reach the rewards",
        normalize_prompt,
        PROMPTS,
        "rl",
        misuse="it has no answers to learn from",
        claim=prompt_claim,
        fields=("prompt",),
        required=1,
    ),
    Format(
        "preference",
        pair_evidence,
        "a prompt (prompt, messages, instruction or question) with chosen and rejected answers",
        normalize_pair,
        PREFERENCE,
        "preference",
        misuse="supervised fine-tuning would train on part of each record only",
    ),
    Format(
        "kto",
        labelled_evidence,
        "a prompt with a completion (or a conversation ending with it) and a boolean label",
        normalize_labelled,
        PREFERENCE,
        "preference",
        misuse="supervised fine-tuning would also train the answers marked bad",
        claim=labelled_claim,
    ),
    Format(
        "conversation",
        _keys_present("messages", "conversations"),
        "messages or conversations (a list of role/content or from/value turns), optional "
        "system and tools",
        normalize_conversation,
        SUPERVISED,
        "chat",
    ),
    Format(
        "alpaca",
        _keys_present("instruction", "output"),
        "instruction, output, optional input, system, history and tools",
        normalize_alpaca,
        SUPERVISED,
        "instruction",
        fields=("instruction", "output", "input", "system"),
        required=2,
    ),
    Format(
        "qa",
        _keys_present("question", "answer"),
        "question, answer, optional context and system",
        normalize_qa,
        SUPERVISED,
        "qa",
        fields=("question", "answer", "context", "system"),
        required=2,
    ),
    Format(
        "prompt_completion",
        _keys_present("prompt", "completion"),
        "prompt, completion (strings, or TRL's conversational message lists)",
        normalize_prompt_completion,
        SUPERVISED,
        "custom",
        fields=("prompt", "completion"),
        required=2,
    ),
    Format(
        "text",
        _keys_present("text"),
        "text",
        normalize_text,
        SUPERVISED,
        "custom",
        fields=("text",),
        required=1,
    ),
)
SPECS_BY_NAME = {spec.name: spec for spec in FORMAT_SPECS}
FORMATS = tuple(SPECS_BY_NAME)
#: Formats whose records are conversations: sources in different ones of these can be mixed
#: (they are then written as conversations).
CHAT_FORMATS = ("alpaca", "qa", "conversation")
#: What a normalized row holds besides what its format sets.
ROW_DEFAULTS: dict[str, Any] = {
    "context": "",
    "tools": "",
    "chosen": "",
    "rejected": "",
    "completion": "",
    "label": None,
    "extra": "",
}

_FORMAT_ALIASES = {
    "instruction": "alpaca",
    "chat": "conversation",
    "conversations": "conversation",
    "messages": "conversation",
    "sharegpt": "conversation",
    "completion": "prompt_completion",
    "prompt-completion": "prompt_completion",
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
    "chosen",
    "rejected",
    "label",
    "role",
    "content",
)

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}")

#: Names other datasets give these fields (databricks-dolly: ``response``, ``context``), for
#: the ``columns`` mapping a refusal suggests.
FIELD_ALIASES = {
    "output": ("response", "completion", "answer", "target", "output_text"),
    "input": ("context", "input_text"),
    "instruction": ("prompt", "query", "question"),
    "question": ("query", "prompt", "instruction"),
    "answer": ("response", "output", "completion"),
    "context": ("input", "passage", "document"),
    "prompt": ("query", "instruction", "question", "input"),
    "completion": ("response", "output", "answer"),
    "text": ("content", "document", "body"),
}


def suggest_columns(
    record: Mapping[str, Any], spec: Format, *, all_required: bool = False
) -> tuple[dict[str, str], int]:
    """The ``columns`` mapping that would read fields of ``spec`` the record lacks from the
    usual other names it holds, and how far down the alias lists they are (0: each the first
    alias). Empty when there is none, or with ``all_required`` when a required field stays
    missing."""
    mapping: dict[str, str] = {}
    rank = 0
    for name in spec.fields:
        if name in record:
            continue
        aliases = FIELD_ALIASES.get(name, ())
        for position, alias in enumerate(aliases):
            if alias in record and alias not in spec.fields and alias not in mapping.values():
                mapping[name] = alias
                rank += position
                break
    required = spec.fields[: spec.required]
    if all_required and not all(f in record or f in mapping for f in required):
        return {}, rank
    return mapping, rank


def columns_hint(mapping: Mapping[str, str]) -> str:
    """``; the record has 'response': read it with columns={'output': 'response'}``."""
    if not mapping:
        return ""
    found = ", ".join(repr(alias) for alias in mapping.values())
    pairs = ", ".join(f"{name!r}: {alias!r}" for name, alias in mapping.items())
    pronoun = "it" if len(mapping) == 1 else "them"
    return f"; the record has {found}: read {pronoun} with columns={{{pairs}}}"


def normalized_features() -> Any:
    """The Arrow columns of normalized rows."""
    from datasets import Features, List, Value

    return Features(
        {
            "kind": Value("string"),
            "messages": List(
                {"role": Value("string"), "content": Value("string"), "extra": Value("string")}
            ),
            "context": Value("string"),
            "tools": Value("string"),
            "chosen": Value("string"),
            "rejected": Value("string"),
            "completion": Value("string"),
            "label": Value("bool"),
            "extra": Value("string"),
            "location": Value("string"),
        }
    )


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


# --- what no method trains: media ---------------------------------------------------------

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


def media_evidence(record: Mapping[str, Any]) -> str | None:
    """What shows that ``record`` holds images, audio or video, or None."""
    for key in MEDIA_KEYS:
        if record.get(key) not in (None, "", [], {}):
            return f"a non-empty {key!r} column"
    return _media_in(record)


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


def record_kind(record: Any) -> str | None:
    """``"preference"``, ``"kto"`` or ``"multimodal"`` for records supervised fine-tuning
    cannot train without dropping part of them; None for everything else."""
    if not isinstance(record, Mapping):
        return None
    if media_evidence(record):
        return "multimodal"
    found = detect_format(record)
    return found if found in ("preference", "kto") else None


def detect_format(record: Mapping[str, Any], reading: Sequence[str] = ()) -> str | None:
    """The format of ``record`` (the first in detection order that recognises it); for a
    method that reads ``reading``, its formats recognise their records more loosely."""
    for spec in FORMAT_SPECS:
        test = spec.claim if spec.claim is not None and spec.name in reading else spec.evidence
        if test(record):
            return spec.name
    return None


@dataclass(frozen=True)
class Reader:
    """Who reads the records: a training method's name, what it is called in prose, the
    formats it trains on and a description of them (for messages)."""

    method: str
    title: str
    formats: tuple[str, ...]
    reads: str


class Unsupported(Exception):
    """A record of a kind the method does not train on (never skipped): ``kind`` is the
    record's format, or ``multimodal``."""

    def __init__(self, kind: str, evidence: str, reader: Reader) -> None:
        super().__init__(f"{kind} data ({evidence})")
        self.kind = kind
        self.evidence = evidence
        self.reader = reader

    def message(self, source: str) -> str:
        """One line: the kind of data, why it is refused, and what to use instead."""
        if self.kind == "multimodal":
            return (
                f"this is multimodal data ({self.evidence}); this plugin fine-tunes text-only "
                "models, which would learn to describe media they never see. Remove the media "
                "from the records, or use a vision-language fine-tuning tool"
            )
        from ..methods import readers_of

        spec, reader = SPECS_BY_NAME[self.kind], self.reader
        label = "KTO" if self.kind == "kto" else self.kind
        other_family = {SPECS_BY_NAME[f].family for f in reader.formats} != {spec.family}
        why = f"{reader.title} trains on {reader.reads}"
        if spec.misuse and other_family:
            why = spec.misuse
        methods = readers_of(self.kind)
        command = f"sage finetune quickstart {spec.task_type} --data {source}"
        if methods:
            command += f" --method {methods[0]}"
        more = f" (or {', '.join(methods[1:])})" if len(methods) > 1 else ""
        return f"this is {label} data ({self.evidence}); {why}. Train it with `{command}`{more}"


# --- validation -------------------------------------------------------------------------------


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
    """Checks records one by one for ``reader`` against one format (forced, or detected from the
    first among the formats it reads), after renaming mapped ``columns`` and filling
    ``{{KEY}}`` ``placeholders``."""

    def __init__(
        self,
        reader: Reader,
        forced: str | None = None,
        columns: Mapping[str, str] | None = None,
        placeholders: Mapping[str, str] | None = None,
    ) -> None:
        if forced is not None and forced not in reader.formats:
            raise ConfigError(
                f"{reader.method} does not train on {forced} data: it reads "
                f"{', '.join(reader.formats)}."
            )
        self.reader = reader
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
        media = media_evidence(record)
        if media:
            raise Unsupported("multimodal", media, self.reader)
        found = detect_format(record, self.reader.formats)
        if found is not None and found not in self.reader.formats:
            evidence = SPECS_BY_NAME[found].evidence(record) or ""
            raise Unsupported(found, evidence, self.reader)
        if self.format is None:
            if found is None:
                raise Invalid("unknown format", self._unknown_message(record))
            self.format, self.first_location = found, location
        elif found != self.format and not self.forced:
            raise Invalid("mixed formats", self._mixed_message(record, found))
        elif not (SPECS_BY_NAME[self.format].claim or SPECS_BY_NAME[self.format].evidence)(record):
            spec = SPECS_BY_NAME[self.format]
            raise Invalid(
                "wrong fields",
                f"expected {self.format} fields ({spec.expected}); found keys {_keys(record)}"
                + (f", which are {found} fields" if found else ""),
                looks_like=found,
            )
        spec = SPECS_BY_NAME[self.format]
        try:
            row = {**ROW_DEFAULTS, **spec.normalize(record, self.columns)}
        except Invalid as exc:
            if exc.reason != "missing field":
                raise
            hint = columns_hint(suggest_columns(record, spec)[0])
            raise Invalid(exc.reason, f"{exc}{hint}") from None
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
        for key in ("context", "chosen", "rejected", "completion"):
            row[key] = fill(row[key])
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
            "Use one format per file, or force one with data_format"
        )

    def _unknown_message(self, record: Mapping[str, Any]) -> str:
        specs = [s for s in FORMAT_SPECS if s.name in self.reader.formats]
        known = "; ".join(f"{s.name}: {s.expected}" for s in specs)
        found = [suggest_columns(record, s, all_required=True) for s in specs]
        best = min((f for f in found if f[0]), key=lambda f: f[1], default=({}, 0))[0]
        hint = columns_hint(best)
        return (
            f"no known training fields (keys: {_keys(record)}). {self.reader.method} reads: "
            f"{known}" + (hint or "; map other names with columns={FIELD: COLUMN}")
        )


def placeholder_warning(unfilled: Mapping[str, int], records: int, example: str) -> str:
    names = ", ".join("{{" + name + "}}" for name, _ in Counter(unfilled).most_common(5))
    more = f" and {len(unfilled) - 5} more" if len(unfilled) > 5 else ""
    return (
        f"{records} record(s) hold placeholders ({names}{more}; first in {example}) that would "
        "be trained verbatim: fill them with placeholders={KEY: VALUE}"
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
        "(as conversations), other formats only with their own kind. Make separate tasks."
    )


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
    if SPECS_BY_NAME[fmt].family == PREFERENCE:
        return canonical_preference(row)
    if fmt == "prompts":
        return canonical_prompt(row)
    messages = message_dicts(row)
    tools = row_tools(row)
    if fmt == "text":
        return {"text": messages[0]["content"]}
    if fmt == "prompt_completion" and row["kind"] == "completion":
        return {"prompt": messages[0]["content"], "completion": messages[1]["content"]}
    if fmt == "prompt_completion":  # TRL's conversational form: the completion after the user
        split = max(i for i, m in enumerate(messages) if m["role"] == "user") + 1
        prompt = [{k: v for k, v in m.items() if k != "weight"} for m in messages[:split]]
        record: dict[str, Any] = {"prompt": prompt, "completion": messages[split:]}
        return {**record, "tools": tools} if tools else record
    if fmt == "conversation":
        record = {"messages": with_context(messages, row.get("context", ""))}
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
