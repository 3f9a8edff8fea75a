"""Training data: load, validate, normalize, render, tokenize with prompt masking, cache.

``load_training_data`` reads ``.json``, ``.jsonl``, ``.csv``, ``.parquet`` or a directory written
by ``datasets.save_to_disk``, record by record (JSONL, CSV and Parquet stream, so a large file
never sits in memory as Python objects), checks every record and normalizes it into one shape:

    kind      "chat" (alpaca, qa, conversation), "completion" (prompt/completion) or "text"
    messages  list of {"role", "content"}; roles system / user / assistant
              (a completion is [user: prompt, assistant: completion]; text is [text: ...])
    context   the alpaca ``input`` / qa ``context`` that goes with the first user turn ("" if none)
    location  where the record came from ("line 12"), for error messages

The normalized rows are written to an Arrow file and memory-mapped (datasets).

``prepare_dataset`` renders each row (through the tokenizer's chat template when it has one,
else through ``### Instruction:`` / ``### Input:`` / ``### Response:`` templates), tokenizes it
segment by segment so that labels are -100 exactly on prompt tokens, makes sure every sample
ends with the tokenizer's EOS, truncates to ``max_length``, and caches the result under
``cache_dir/<key>`` (datasets.save_to_disk), keyed by the data's content, the tokenizer, the
template and the options. Batches are padded dynamically by ``PaddingCollator``; with packing,
``PackingCollator`` concatenates a batch into one row with position ids restarting at every
sample (transformers' padding-free "flattening"; see its docstring for which attention
implementations keep samples apart).

Nothing heavy is imported at module level: datasets, transformers and torch are imported in
the functions that use them.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import TrainingConfig
from .errors import DataError, UsageProblem

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

#: Bumped whenever rendering or tokenization changes, so old caches are not reused.
PIPELINE_VERSION = 1
#: Label value the loss ignores.
IGNORE_INDEX = -100
#: Below this many rows, datasets' progress bars are hidden (they would only be noise).
PROGRESS_MIN_ROWS = 10_000
#: Prepared datasets kept per cache directory (the most recently written ones).
CACHE_ENTRIES_KEPT = 3

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
_FALLBACK_HEADERS = {
    "system": "### System:\n",
    "user": "### Instruction:\n",
    "context": "### Input:\n",
    "assistant": "### Response:\n",
}


def resolve_format(name: str | None) -> str | None:
    """The canonical format name for ``name`` (aliases such as ``sharegpt`` accepted)."""
    if name is None:
        return None
    canonical = _FORMAT_ALIASES.get(name.lower(), name.lower())
    if canonical not in FORMATS:
        raise UsageProblem(
            f"Unknown data format {name!r}: choose one of {', '.join(FORMATS)} "
            f"(aliases: {', '.join(sorted(_FORMAT_ALIASES))})."
        )
    return canonical


# --- record validation and normalization -------------------------------------------------


class _Invalid(Exception):
    """A record is malformed: ``reason`` is the category counted by --skip-invalid."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _text(record: Mapping[str, Any], key: str, *, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise _Invalid("missing field", f"missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise _Invalid(
            "non-string value", f"field {key!r} must be a string, got {type(value).__name__}"
        )
    if required and not value.strip():
        raise _Invalid("empty field", f"field {key!r} is empty")
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
        raise _Invalid("missing field", f"missing field {key!r}")
    if not isinstance(turns, list):
        raise _Invalid(
            "non-list conversation", f"field {key!r} must be a list, got {type(turns).__name__}"
        )
    messages = [_normalize_message(turn, number) for number, turn in enumerate(turns, 1)]
    last_answer = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last_answer < 0:
        raise _Invalid("no assistant turn", f"{key!r} has no assistant (or gpt) message")
    # Turns after the last answer teach nothing (they carry no trainable tokens).
    return {"kind": "chat", "messages": messages[: last_answer + 1], "context": ""}


def _normalize_message(turn: Any, number: int) -> dict[str, str]:
    if not isinstance(turn, Mapping):
        raise _Invalid(
            "malformed message", f"message {number} must be an object, got {type(turn).__name__}"
        )
    role_key, content_key = ("from", "value") if "from" in turn else ("role", "content")
    role, content = turn.get(role_key), turn.get(content_key)
    if role is None or content is None:
        raise _Invalid("missing field", f"message {number} needs {role_key!r} and {content_key!r}")
    if not isinstance(role, str):
        raise _Invalid("non-string value", f"message {number}: {role_key!r} must be a string")
    if role.lower() not in _ROLES:
        raise _Invalid(
            "unknown role",
            f"message {number} has unknown role {role!r} "
            "(expected system, user or human, assistant or gpt)",
        )
    if not isinstance(content, str):
        raise _Invalid(
            "non-string value",
            f"message {number}: {content_key!r} must be a string, got {type(content).__name__}",
        )
    if not content.strip():
        raise _Invalid("empty field", f"message {number} has empty {content_key!r}")
    return {"role": _ROLES[role.lower()], "content": content}


@dataclass(frozen=True)
class _Format:
    name: str
    markers: tuple[str, ...]  # any of these keys present: the record looks like this format
    expected: str  # for error messages
    normalize: Callable[[Mapping[str, Any]], dict[str, Any]]


# Detection order matters: alpaca exports often carry a rendered "text" column too.
_FORMAT_SPECS = (
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
_SPECS_BY_NAME = {spec.name: spec for spec in _FORMAT_SPECS}


def _detect(record: Mapping[str, Any]) -> str | None:
    return next((s.name for s in _FORMAT_SPECS if any(k in record for k in s.markers)), None)


def _keys(record: Mapping[str, Any]) -> str:
    return ", ".join(sorted(str(k) for k in record)) or "none"


class _Validator:
    """Checks records one by one against one format (forced, or detected from the first)."""

    def __init__(self, forced: str | None) -> None:
        self.format = forced
        self.forced = forced is not None
        self.first_location: str | None = None

    def normalize(self, record: Any, location: str) -> dict[str, Any]:
        if not isinstance(record, Mapping):
            raise _Invalid("not an object", f"expected a JSON object, found {_json_type(record)}")
        found = _detect(record)
        if self.format is None:
            if found is None:
                raise _Invalid("unknown format", self._unknown_message(record))
            self.format, self.first_location = found, location
        elif found != self.format and not self.forced:
            raise _Invalid("mixed formats", self._mixed_message(record, found))
        elif not any(k in record for k in _SPECS_BY_NAME[self.format].markers):
            spec = _SPECS_BY_NAME[self.format]
            raise _Invalid(
                "wrong fields",
                f"expected {self.format} fields ({spec.expected}); found keys {_keys(record)}",
            )
        row = _SPECS_BY_NAME[self.format].normalize(record)
        row["location"] = location
        return row

    def _mixed_message(self, record: Mapping[str, Any], found: str | None) -> str:
        spec = _SPECS_BY_NAME[self.format]
        looks = f"looks like {found}" if found else "has no known fields"
        return (
            f"record {looks} (keys: {_keys(record)}) but the data is {self.format} "
            f"(detected from {self.first_location}; expected {spec.expected}). "
            "Use one format per file, or force one with --format"
        )

    @staticmethod
    def _unknown_message(record: Mapping[str, Any]) -> str:
        known = "; ".join(f"{s.name}: {s.expected}" for s in _FORMAT_SPECS)
        return f"no known training fields (keys: {_keys(record)}). Expected one of: {known}"


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else "a value")


# --- readers: (location, record) pairs from every supported source ---------------------------


def _records_from(source: Path) -> Iterator[tuple[str, Any]]:
    if source.is_dir():
        yield from _read_saved_dataset(source)
        return
    suffix = source.suffix.lower()
    readers = {
        ".jsonl": _read_jsonl,
        ".json": _read_json,
        ".csv": _read_csv,
        ".parquet": _read_parquet,
    }
    if suffix not in readers:
        raise DataError(
            f"{source}: unsupported file type {suffix or '(none)'!r}; use "
            f"{', '.join(readers)} or a directory written by datasets.save_to_disk."
        )
    yield from readers[suffix](source)


def _read_jsonl(source: Path) -> Iterator[tuple[str, Any]]:
    with _open_binary(source) as handle:
        for number, raw in enumerate(handle, 1):
            location = f"line {number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield location, _Invalid("not UTF-8", f"not valid UTF-8 ({exc.reason})")
                continue
            if not line.strip():
                continue
            try:
                yield location, json.loads(line)
            except json.JSONDecodeError as exc:
                yield (
                    location,
                    _Invalid("invalid JSON", f"invalid JSON at column {exc.colno}: {exc.msg}"),
                )


def _read_json(source: Path) -> Iterator[tuple[str, Any]]:
    with _open_binary(source) as handle:
        raw = handle.read()
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{source}: not valid UTF-8 ({exc.reason}).") from None
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object per line, named .json
            yield from _read_jsonl(source)
            return
        raise DataError(
            f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}."
        ) from None
    if isinstance(data, dict):
        data = _records_in_object(source, data)
    if not isinstance(data, list):
        raise DataError(
            f"{source}: expected a list of records (or an object holding one), "
            f"found {_json_type(data)}."
        )
    for number, record in enumerate(data, 1):
        yield f"record {number}", record


def _records_in_object(source: Path, data: dict[str, Any]) -> list[Any]:
    if _detect(data) is not None:  # a single record
        return [data]
    lists = [key for key, value in data.items() if isinstance(value, list)]
    if len(lists) != 1:
        raise DataError(
            f"{source}: a JSON object must hold exactly one list of records "
            f"(found {len(lists)} lists: {', '.join(lists) or 'none'})."
        )
    return data[lists[0]]


def _read_csv(source: Path) -> Iterator[tuple[str, Any]]:
    # Code answers easily exceed the csv module's default 128 KiB cell limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with _open_binary(source) as binary:
        text = (line.decode("utf-8-sig") for line in binary)
        try:
            for number, row in enumerate(csv.DictReader(text), 1):
                yield f"row {number}", {k: v for k, v in row.items() if isinstance(k, str)}
        except UnicodeDecodeError as exc:
            raise DataError(f"{source}: not valid UTF-8 ({exc.reason}).") from None
        except csv.Error as exc:
            raise DataError(f"{source}: malformed CSV ({exc}).") from None


def _read_parquet(source: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{source}: cannot read Parquet ({exc}).") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=1000):
        for record in batch.to_pylist():
            number += 1
            yield f"row {number}", record


def _read_saved_dataset(source: Path) -> Iterator[tuple[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    try:
        saved = load_from_disk(str(source))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(
            f"{source}: a directory, but not one written by datasets.save_to_disk ({exc})."
        ) from None
    if isinstance(saved, DatasetDict):
        if "train" in saved:
            saved = saved["train"]
        elif len(saved) == 1:
            saved = next(iter(saved.values()))
        else:
            raise DataError(
                f"{source}: a DatasetDict with splits {', '.join(saved)} and no 'train' split."
            )
    for number, record in enumerate(saved, 1):
        yield f"row {number}", record


@contextlib.contextmanager
def _open_binary(source: Path) -> Iterator[Any]:
    try:
        handle = source.open("rb")
    except FileNotFoundError:
        raise DataError(f"{source}: no such file.") from None
    except OSError as exc:
        raise DataError(f"{source}: cannot read ({exc.strerror or exc}).") from None
    with handle:
        yield handle


def content_hash(source: str | os.PathLike[str] | Sequence[Mapping[str, Any]]) -> str:
    """SHA-256 of a data file, of every file of a saved dataset directory, or of records."""
    digest = hashlib.sha256()
    if isinstance(source, str | os.PathLike):
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"{path}: no such file or directory.")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(path) if path.is_dir() else "").encode())
            with _open_binary(file) as handle:
                for chunk in iter(lambda h=handle: h.read(1 << 20), b""):
                    digest.update(chunk)
    else:
        digest.update(json.dumps(list(source), sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()


# --- loading ---------------------------------------------------------------------------------


@dataclass
class LoadedData:
    """Validated, normalized records (memory-mapped) and what loading found.

    ``dataset`` has the columns kind, messages, context and location (see the module
    docstring); ``records()`` gives them back in the canonical spelling of ``format``.
    """

    dataset: Dataset
    format: str
    source: str
    content_hash: str
    records_read: int
    dropped: dict[str, int] = field(default_factory=dict)
    drop_examples: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def records_dropped(self) -> int:
        return sum(self.dropped.values())

    def records(self) -> Iterator[dict[str, Any]]:
        """Each record in the canonical keys of its format (what quickstart writes)."""
        for row in self.dataset:
            yield _canonical_record(self.format, row)


def _canonical_record(fmt: str, row: Mapping[str, Any]) -> dict[str, Any]:
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


def load_training_data(
    path: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    format: str | None = None,
    *,
    skip_invalid: bool = False,
) -> LoadedData:
    """Read, validate and normalize training data.

    ``path`` is a ``.json`` (a list, or an object holding one list), ``.jsonl``, ``.csv`` or
    ``.parquet`` file, a directory written by ``datasets.save_to_disk``, or a list of records.
    The format (alpaca, qa, conversation, prompt_completion, text) is detected from the first
    record and every other record must match it, unless ``format`` forces one. A bad record
    raises DataError naming it; with ``skip_invalid`` bad records are dropped and counted by
    reason instead. No valid record left raises DataError.

    JSONL, CSV and Parquet are read one record at a time and the normalized records go to an
    Arrow file that is memory-mapped, so memory does not grow with the file. A ``.json`` array
    is parsed whole: use JSONL for large data.
    """
    return _load(path, resolve_format(format), skip_invalid, content_hash(path))


def _load(
    path: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    forced: str | None,
    skip_invalid: bool,
    digest: str,
) -> LoadedData:
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter
    from datasets.fingerprint import get_temporary_cache_files_directory

    if isinstance(path, str | os.PathLike):
        name, records = os.fspath(path), _records_from(Path(path).expanduser())
    else:
        name, records = "<records>", ((f"record {n}", r) for n, r in enumerate(path, 1))
    validator = _Validator(forced)
    dropped: Counter[str] = Counter()
    examples: dict[str, str] = {}
    read = 0
    # datasets removes its temporary cache directory when the process ends; until then the
    # normalized file stays valid for everything derived from it (map, shuffle, ...).
    workdir = tempfile.mkdtemp(prefix="normalized-", dir=get_temporary_cache_files_directory())
    arrow_file = os.path.join(workdir, "normalized.arrow")
    try:
        with ArrowWriter(features=_normalized_features(), path=arrow_file) as writer:
            for location, record in records:
                read += 1
                try:
                    if isinstance(record, _Invalid):  # a line that could not be parsed
                        raise record
                    writer.write(validator.normalize(record, location))
                except _Invalid as exc:
                    if not skip_invalid:
                        hint = " (or pass --skip-invalid to drop bad records)"
                        raise DataError(f"{name}: {location}: {exc}{hint}.") from None
                    dropped[exc.reason] += 1
                    examples.setdefault(exc.reason, f"{location}: {exc}")
            writer.finalize()
        dataset = Dataset.from_file(arrow_file)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    loaded = LoadedData(
        dataset, validator.format or "", name, digest, read, dict(dropped), examples
    )
    if not len(dataset):
        why = "; ".join(f"{n} {r} (e.g. {examples[r]})" for r, n in dropped.items())
        raise DataError(f"{name}: no valid training records" + (f": {why}." if why else "."))
    return loaded


def _normalized_features() -> Any:
    from datasets import Features, List, Value

    return Features(
        {
            "kind": Value("string"),
            "messages": List({"role": Value("string"), "content": Value("string")}),
            "context": Value("string"),
            "location": Value("string"),
        }
    )


# --- rendering ---------------------------------------------------------------------------------


class _TemplateMismatch(Exception):
    pass


class Renderer:
    """Turns a normalized row into (text, trainable) segments and token ids with labels.

    With a chat template the conversation is rendered once; each assistant turn's span is
    found by rendering the conversation up to that turn (with and without the generation
    prompt), so whatever the template adds around a turn stays in the prompt. Without a
    template the ``### Instruction:`` style is used. Segments are tokenized separately, so a
    label boundary never falls inside a token.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None,
        *,
        max_length: int | None = None,
        train_on_prompt: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.train_on_prompt = train_on_prompt
        self.chat_template = bool(
            tokenizer is not None and getattr(tokenizer, "chat_template", None)
        )
        self.template = "chat_template" if self.chat_template else "fallback"
        self.eos = ""
        self.bos_ids: list[int] = []
        if tokenizer is not None:
            if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
                raise DataError(
                    f"Tokenizer {tokenizer.name_or_path!r} has no EOS token; set one "
                    "(tokenizer.eos_token) so the model can learn where an answer ends."
                )
            self.eos = tokenizer.eos_token
            bos = tokenizer.bos_token_id
            if bos is not None and tokenizer("a")["input_ids"][:1] == [bos]:
                self.bos_ids = [bos]

    # -- text --------------------------------------------------------------------------------

    def segments(self, row: Mapping[str, Any]) -> list[tuple[str, bool]]:
        """The sample as (text, trainable) pieces; joined, they are the training text."""
        messages = row["messages"]
        if row["kind"] == "text":
            return [(messages[0]["content"] + self.eos, True)]
        if row["kind"] == "completion":
            return [(messages[0]["content"], False), (messages[1]["content"] + self.eos, True)]
        if self.chat_template:
            return self._template_segments(self._with_context(messages, row["context"]), row)
        return self._fallback_segments(messages, row["context"])

    @staticmethod
    def _with_context(messages: list[dict[str, str]], context: str) -> list[dict[str, str]]:
        if not context.strip():
            return messages
        out = [dict(m) for m in messages]
        first_user = next(m for m in out if m["role"] == "user")
        first_user["content"] += "\n\n" + context
        return out

    def _fallback_segments(
        self, messages: list[dict[str, str]], context: str
    ) -> list[tuple[str, bool]]:
        segments: list[tuple[str, bool]] = []
        prompt, context_pending = "", bool(context.strip())
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "assistant":
                segments += [(prompt + _FALLBACK_HEADERS["assistant"], False)]
                segments += [(content + self.eos, True)]
                prompt = "\n\n"
                continue
            prompt += f"{_FALLBACK_HEADERS[role]}{content}\n\n"
            if role == "user" and context_pending:
                prompt += f"{_FALLBACK_HEADERS['context']}{context}\n\n"
                context_pending = False
        return segments

    def _template_segments(
        self, messages: list[dict[str, str]], row: Mapping[str, Any]
    ) -> list[tuple[str, bool]]:
        try:
            full = self._apply(messages)
            segments: list[tuple[str, bool]] = []
            cursor = 0
            last = len(messages) - 1
            for i, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                start = self._answer_start(messages, i, full, cursor)
                end = self._answer_end(messages, i, full, start, upto=full if i == last else None)
                segments += [(full[cursor:start], False), (full[start:end], True)]
                cursor = end
        except _TemplateMismatch:
            raise DataError(
                f"{row['location']}: the tokenizer's chat template does not render assistant "
                "turns verbatim, so the prompt cannot be masked; set train_on_prompt or use a "
                "tokenizer without this template."
            ) from None
        except Exception as exc:  # jinja2 errors raised by the template itself
            if isinstance(exc, DataError):
                raise
            raise DataError(
                f"{row['location']}: the tokenizer's chat template rejected this conversation "
                f"({type(exc).__name__}: {exc})."
            ) from None
        tail = full[cursor:]
        if tail.strip():
            segments.append((tail, False))
        return [(text, trainable) for text, trainable in segments if text]

    def _apply(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        assert self.tokenizer is not None
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _opening(self) -> str:
        """What the template puts before a conversation that opens with the assistant."""
        try:
            return self._apply([], generation_prompt=True)
        except Exception:  # templates may refuse an empty conversation
            return ""

    def _answer_start(self, messages: list[dict[str, str]], i: int, full: str, cursor: int) -> int:
        prefix = self._apply(messages[:i], generation_prompt=True) if i else self._opening()
        if full.startswith(prefix) and len(prefix) >= cursor:
            return len(prefix)
        position = full.find(messages[i]["content"], cursor)
        if position < 0:
            raise _TemplateMismatch
        return position

    def _answer_end(
        self, messages: list[dict[str, str]], i: int, full: str, start: int, upto: str | None
    ) -> int:
        upto = self._apply(messages[: i + 1]) if upto is None else upto
        if full.startswith(upto) and len(upto.rstrip()) > start:
            return len(upto.rstrip())
        end = start + len(messages[i]["content"])
        if full[end:].startswith(self.eos):
            end += len(self.eos)
        return end

    # -- tokens --------------------------------------------------------------------------------

    def encode(self, rows: Sequence[Mapping[str, Any]]) -> list[tuple[list[int], list[int], int]]:
        """(input_ids, labels, length before truncation) for each row, tokenized in one call."""
        assert self.tokenizer is not None
        per_row = [self.segments(row) for row in rows]
        texts = [text for segments in per_row for text, _ in segments]
        if not texts:  # tokenizers refuse an empty batch
            return []
        token_lists = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"])
        results = []
        eos_id = self.tokenizer.eos_token_id
        for segments in per_row:
            ids, labels = list(self.bos_ids), [IGNORE_INDEX] * len(self.bos_ids)
            for _, trainable in segments:
                tokens = next(token_lists)
                ids += tokens
                labels += tokens if trainable else [IGNORE_INDEX] * len(tokens)
            if not ids or ids[-1] != eos_id:
                ids.append(eos_id)
                labels.append(eos_id)
            if self.train_on_prompt:
                labels = list(ids)
            full_length = len(ids)
            if self.max_length is not None and full_length > self.max_length:
                ids, labels = ids[: self.max_length], labels[: self.max_length]
            results.append((ids, labels, full_length))
        return results

    def tokenize_batch(self, batch: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
        """Dataset.map function: drops samples whose trainable tokens were all cut off."""
        rows = [
            dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)
        ]
        out: dict[str, list[Any]] = {
            "input_ids": [],
            "labels": [],
            "length": [],
            "trainable": [],
            "full_length": [],
        }
        for ids, labels, full_length in self.encode(rows):
            trainable = sum(1 for label in labels[1:] if label != IGNORE_INDEX)
            if not trainable:
                continue
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["length"].append(len(ids))
            out["trainable"].append(trainable)
            out["full_length"].append(full_length)
        return out

    def fingerprint(self) -> dict[str, Any]:
        """Everything about the tokenizer and template that changes the tokens produced."""
        tokenizer = self.tokenizer
        assert tokenizer is not None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        vocab = (
            backend.to_str()
            if backend is not None
            else json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
        )
        return {
            "class": type(tokenizer).__name__,
            "vocab": hashlib.sha256(vocab.encode()).hexdigest(),
            "special_tokens": tokenizer.all_special_tokens,
            "eos": self.eos,
            "bos_ids": self.bos_ids,
            "template": getattr(tokenizer, "chat_template", None) if self.chat_template else None,
        }


def preview_samples(
    loaded: LoadedData,
    tokenizer: PreTrainedTokenizerBase,
    count: int,
    *,
    max_length: int | None = None,
    train_on_prompt: bool = False,
) -> list[list[tuple[str, bool]]]:
    """The first ``count`` samples as the model sees them: decoded token runs, each marked
    trainable (in the loss) or not, after truncation."""
    renderer = Renderer(tokenizer, max_length=max_length, train_on_prompt=train_on_prompt)
    rows = list(loaded.dataset.select(range(min(count, len(loaded)))))
    samples = []
    for ids, labels, _ in renderer.encode(rows):
        runs: list[tuple[list[int], bool]] = []
        for token, label in zip(ids, labels, strict=True):
            trainable = label != IGNORE_INDEX
            if runs and runs[-1][1] == trainable:
                runs[-1][0].append(token)
            else:
                runs.append(([token], trainable))
        samples.append([(tokenizer.decode(tokens), trainable) for tokens, trainable in runs])
    return samples


def _format_sample(fmt: str, record: Mapping[str, Any], tokenizer: Any) -> str:
    try:
        row = _SPECS_BY_NAME[fmt].normalize(record)
    except _Invalid as exc:
        raise DataError(f"Invalid {fmt} record: {exc}.") from None
    row["location"] = "record"
    return "".join(text for text, _ in Renderer(tokenizer).segments(row))


def format_alpaca_sample(
    record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase | None = None
) -> str:
    """The training text of an alpaca record (``instruction``, optional ``input``, ``output``).

    With a tokenizer that has a chat template: the conversation rendered through it (the
    input follows the instruction in the user turn). Otherwise the ``### Instruction:`` /
    ``### Input:`` / ``### Response:`` template. Ends with the tokenizer's EOS when a tokenizer
    is given. Raises DataError for a malformed record.
    """
    return _format_sample("alpaca", record, tokenizer)


def format_qa_sample(
    record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase | None = None
) -> str:
    """The training text of a qa record (``question``, ``answer``, optional ``context``);
    rendered like an alpaca record with the question as instruction and context as input."""
    return _format_sample("qa", record, tokenizer)


def format_conversation_sample(
    record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase | None = None
) -> str:
    """The training text of a conversation (``messages`` or ``conversations``, role/content or
    ShareGPT from/value turns), through the chat template or the ``###`` fallback."""
    return _format_sample("conversation", record, tokenizer)


def format_text_sample(
    record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase | None = None
) -> str:
    """The training text of a text record: ``text`` itself, plus EOS when a tokenizer is given."""
    return _format_sample("text", record, tokenizer)


# --- preparation -------------------------------------------------------------------------------


@dataclass
class DataStats:
    """What preparation found, for the user (all token figures after truncation)."""

    format: str
    template: str
    max_length: int
    records_read: int = 0
    records_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    drop_examples: dict[str, str] = field(default_factory=dict)
    samples: int = 0
    eval_samples: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    truncated: int = 0
    length_p50: int = 0
    length_p90: int = 0
    length_p99: int = 0
    length_max: int = 0
    from_cache: bool = False
    cache_key: str | None = None

    @property
    def records_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def trainable_share(self) -> float:
        return self.trainable_tokens / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["records_dropped"] = self.records_dropped
        data["trainable_share"] = round(self.trainable_share, 4)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataStats:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [
            f"records: {self.records_read} read, {self.records_kept} valid, "
            f"{self.records_dropped} dropped; format {self.format}, template {self.template}",
            f"samples: {self.samples} train, {self.eval_samples} eval; "
            f"{self.truncated} truncated to {self.max_length} tokens",
            f"tokens: {self.tokens} ({self.trainable_tokens} trained on, "
            f"{self.trainable_share:.0%}); length p50 {self.length_p50}, p90 {self.length_p90}, "
            f"p99 {self.length_p99}, max {self.length_max}",
        ]
        lines += [
            f"dropped {n}: {reason} (e.g. {self.drop_examples.get(reason, '-')})"
            for reason, n in self.dropped.items()
        ]
        return "\n".join(lines)


@dataclass
class PreparedDataset:
    """Tokenized data ready for a Trainer.

    ``train`` / ``eval`` have the columns input_ids, labels (-100 on prompt tokens) and length
    (for length-grouped sampling). ``collator`` pads a batch dynamically, or with ``packing``
    flattens it into one row with restarting position ids and no attention mask: the model
    must then run with ``use_cache=False`` for samples to stay apart (see PackingCollator).
    """

    train: Dataset
    eval: Dataset | None
    stats: DataStats
    format: str
    packing: bool
    collator: Callable[[list[Mapping[str, Any]]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class _Options:
    format: str | None
    max_length: int
    train_on_prompt: bool
    packing: bool
    eval_ratio: float
    eval_data: str | None
    seed: int


def prepare_dataset(
    data: LoadedData | str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    config: TrainingConfig | None = None,
    *,
    format: str | None = None,
    max_length: int | None = None,
    train_on_prompt: bool | None = None,
    packing: bool | None = None,
    eval_ratio: float | None = None,
    eval_data: str | os.PathLike[str] | None = None,
    skip_invalid: bool = False,
    cache_dir: Path | None = None,
    seed: int | None = None,
) -> PreparedDataset:
    """Tokenize training data with prompt masking, split off eval data, cache the result.

    ``data`` is a LoadedData, a path or a list of records (``format`` and ``skip_invalid``
    apply to the last two and to ``eval_data``). Explicit keyword arguments override
    ``config`` (TrainingConfig defaults when None). With ``cache_dir``, the result is stored
    in ``cache_dir/<key>`` and a later call with the same data content, tokenizer, template
    and options loads it instead of tokenizing again (``stats.from_cache``).
    """
    config = config or TrainingConfig()
    options = _Options(
        format=resolve_format(format if format is not None else config.data_format),
        max_length=max_length if max_length is not None else config.max_length,
        train_on_prompt=train_on_prompt if train_on_prompt is not None else config.train_on_prompt,
        packing=packing if packing is not None else config.packing,
        eval_ratio=eval_ratio if eval_ratio is not None else config.eval_ratio,
        eval_data=os.fspath(eval_data) if eval_data is not None else config.eval_data_path,
        seed=seed if seed is not None else config.seed,
    )
    if options.max_length < 2:
        raise DataError(f"max_length must be at least 2 tokens, got {options.max_length}.")
    if not 0 <= options.eval_ratio < 1:
        raise DataError(f"eval_ratio must be in [0, 1), got {options.eval_ratio}.")
    renderer = Renderer(
        tokenizer, max_length=options.max_length, train_on_prompt=options.train_on_prompt
    )
    digest = data.content_hash if isinstance(data, LoadedData) else content_hash(data)
    key = _cache_key(digest, renderer, options, skip_invalid)
    entry = Path(cache_dir) / key if cache_dir is not None else None
    if entry is not None and (cached := _from_cache(entry, tokenizer, options)):
        return cached

    loaded = (
        data if isinstance(data, LoadedData) else _load(data, options.format, skip_invalid, digest)
    )
    with _progress_bars(len(loaded)):
        tokenized = _tokenize(loaded, renderer, key)
        stats = _statistics(loaded, tokenized, renderer, options)
        tokenized = tokenized.remove_columns(["trainable", "full_length"])
        train, evaluation = _split(tokenized, options, renderer, skip_invalid, key)
        stats.samples, stats.eval_samples = len(train), len(evaluation or [])
        stats.cache_key = key if entry is not None else None
        if entry is not None:
            train, evaluation = _store(entry, train, evaluation, stats)
    return PreparedDataset(
        train, evaluation, stats, loaded.format, options.packing, _collator(tokenizer, options)
    )


def _cache_key(digest: str, renderer: Renderer, options: _Options, skip_invalid: bool) -> str:
    eval_hash = content_hash(options.eval_data) if options.eval_data else None
    fields = {
        "version": PIPELINE_VERSION,
        "data": digest,
        "eval_data": eval_hash,
        "skip_invalid": skip_invalid,
        "tokenizer": renderer.fingerprint(),
        **{
            k: v
            for k, v in dataclasses.asdict(options).items()
            if k not in ("packing", "eval_data")
        },
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def _tokenize(loaded: LoadedData, renderer: Renderer, key: str) -> Dataset:
    from datasets import Features, List, Value

    features = Features(
        {
            "input_ids": List(Value("int32")),
            "labels": List(Value("int32")),
            "length": Value("int32"),
            "trainable": Value("int32"),
            "full_length": Value("int32"),
        }
    )
    return loaded.dataset.map(
        renderer.tokenize_batch,
        batched=True,
        batch_size=1000,
        remove_columns=loaded.dataset.column_names,
        features=features,
        load_from_cache_file=False,
        new_fingerprint=f"{key}-{loaded.content_hash[:16]}",
        desc="Tokenizing",
    )


def _statistics(
    loaded: LoadedData, tokenized: Dataset, renderer: Renderer, options: _Options
) -> DataStats:
    import numpy as np

    columns = tokenized.with_format("numpy", columns=["length", "trainable", "full_length"])
    lengths = np.asarray(columns["length"], dtype=np.int64)
    dropped = dict(loaded.dropped)
    examples = dict(loaded.drop_examples)
    cut_off = len(loaded) - len(tokenized)
    if cut_off:
        reason = "no trainable tokens left after truncation"
        dropped[reason] = cut_off
        examples[reason] = f"answers start after token {options.max_length}"
    if not len(tokenized):
        raise DataError(
            f"{loaded.source}: every sample lost all its answer tokens to truncation at "
            f"max_length={options.max_length}; raise max_length or shorten the prompts."
        )
    p50, p90, p99 = (int(np.percentile(lengths, q)) for q in (50, 90, 99))
    return DataStats(
        format=loaded.format,
        template=renderer.template,
        max_length=options.max_length,
        records_read=loaded.records_read,
        records_kept=len(loaded),
        dropped=dropped,
        drop_examples=examples,
        tokens=int(lengths.sum()),
        trainable_tokens=int(np.asarray(columns["trainable"], dtype=np.int64).sum()),
        truncated=int((np.asarray(columns["full_length"]) > options.max_length).sum()),
        length_p50=p50,
        length_p90=p90,
        length_p99=p99,
        length_max=int(lengths.max()),
    )


def _split(
    tokenized: Dataset, options: _Options, renderer: Renderer, skip_invalid: bool, key: str
) -> tuple[Dataset, Dataset | None]:
    if options.eval_data:
        loaded = load_training_data(options.eval_data, options.format, skip_invalid=skip_invalid)
        evaluation = _tokenize(loaded, renderer, f"{key}-eval")
        return tokenized, evaluation.remove_columns(["trainable", "full_length"])
    if not options.eval_ratio:
        return tokenized, None
    held_out = max(1, round(len(tokenized) * options.eval_ratio))
    if held_out >= len(tokenized):
        # Too little data to hold any out (a preset's eval_ratio on a handful of records):
        # train on everything; stats.eval_samples == 0 tells the user there was no eval.
        return tokenized, None
    parts = tokenized.train_test_split(test_size=held_out, seed=options.seed, shuffle=True)
    return parts["train"], parts["test"]


def _store(
    entry: Path, train: Dataset, evaluation: Dataset | None, stats: DataStats
) -> tuple[Dataset, Dataset | None]:
    """Save atomically (build next to it, then rename) and reload from the saved copy."""
    from datasets import load_from_disk

    entry.parent.mkdir(parents=True, exist_ok=True)
    building = entry.with_name(f".{entry.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        train.save_to_disk(str(building / "train"))
        if evaluation is not None:
            evaluation.save_to_disk(str(building / "eval"))
        (building / "stats.json").write_text(json.dumps(stats.to_dict(), indent=2) + "\n")
        try:
            os.replace(building, entry)
        except OSError:  # another process stored the same key first
            if not (entry / "stats.json").is_file():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    _prune_cache(entry.parent, keep=entry)
    train = load_from_disk(str(entry / "train"))
    evaluation = load_from_disk(str(entry / "eval")) if (entry / "eval").is_dir() else None
    return train, evaluation


def _prune_cache(cache_dir: Path, keep: Path) -> None:
    entries = [p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[CACHE_ENTRIES_KEPT:]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def _from_cache(entry: Path, tokenizer: Any, options: _Options) -> PreparedDataset | None:
    """The cached preparation in ``entry``; None if there is none (a broken one is removed)."""
    from datasets import load_from_disk

    if not (entry / "stats.json").is_file():
        return None
    try:
        stats = DataStats.from_dict(json.loads((entry / "stats.json").read_text()))
        train = load_from_disk(str(entry / "train"))
        evaluation = load_from_disk(str(entry / "eval")) if (entry / "eval").is_dir() else None
    except (OSError, ValueError, TypeError):
        shutil.rmtree(entry, ignore_errors=True)
        return None
    stats.from_cache = True
    os.utime(entry)  # most recently used: kept by pruning
    return PreparedDataset(
        train, evaluation, stats, stats.format, options.packing, _collator(tokenizer, options)
    )


@contextlib.contextmanager
def _progress_bars(rows: int) -> Iterator[None]:
    """Hide datasets' progress bars for small data (they would only be noise)."""
    import datasets

    if rows >= PROGRESS_MIN_ROWS or not datasets.is_progress_bar_enabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


# --- collators -------------------------------------------------------------------------------


def _collator(tokenizer: Any, options: _Options) -> Callable[..., dict[str, Any]]:
    if options.packing:
        return PackingCollator()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PaddingCollator(pad_token_id=pad)


@dataclass
class PaddingCollator:
    """Pads a batch to its longest sample (optionally a multiple of ``pad_to_multiple_of``).

    Returns int64 tensors input_ids, attention_mask and labels; labels are -100 on padding by
    position, never by token id, so a pad token equal to EOS still trains the EOS.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        longest = max(len(row["input_ids"]) for row in rows)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(rows), longest)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class PackingCollator:
    """Packs a batch into one row without padding (transformers' DataCollatorWithFlattening).

    Returns input_ids, labels and position_ids of shape (1, total tokens); position ids
    restart at 0 for every sample and the first label of each sample is -100. There is no
    attention_mask: transformers 5 derives per-sample attention from the restarting position
    ids. flash_attention_2 (varlen), sdpa and eager then keep samples apart, the last two only
    when the model runs without a KV cache (``model.config.use_cache = False``, as in
    training); with a cache, or if an attention_mask is added, samples attend to each other.
    """

    flattener: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from transformers import DataCollatorWithFlattening

        self.flattener = DataCollatorWithFlattening(return_position_ids=True)

    def __call__(self, rows: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        features = [{"input_ids": row["input_ids"], "labels": row["labels"]} for row in rows]
        return self.flattener(features, return_tensors="pt")
