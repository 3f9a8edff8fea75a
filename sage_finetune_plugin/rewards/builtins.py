"""The built-in rewards, named ``builtin:NAME`` or ``builtin:NAME=ARGUMENT`` (docs/rl.md).

Each scores one completion (its text) with the record's columns, in [0, 1]:

- ``exact[=COLUMN]``: 1 when the completion equals the reference (default column ``answer``),
  compared without case, surrounding space and a final full stop.
- ``f1[=COLUMN]``: the token F1 of the completion against the reference (as ``eval``).
- ``regex=PATTERN``: 1 when the pattern is found in the completion (``re.search``; anchor it
  with ``^...$`` or ``\\Z`` to hold the whole completion).
- ``length=MIN-MAX``: 1 when the completion has MIN to MAX characters, falling linearly to 0
  at 0 and at twice MAX.
- ``json``: 1 when the completion (or its fenced code block) is JSON.
- ``json_keys=KEY,KEY``: the share of the keys present in the completion's JSON object (0
  when it is not one).
- ``tool_call``: 1 when the completion calls one of the record's ``tools`` (a JSON object
  with ``name`` and ``arguments``, bare or in ``<tool_call>`` tags) with its required
  arguments; 0.5 for a known tool without them.
- ``code_parses``: 1 when the completion's Python code (its fenced block, else the whole
  text) parses (``ast.parse``).
- ``code_tests[=COLUMN]``: 1 when the completion's code passes the tests of the column
  (default ``tests``), run in a limited child process (rewards/sandbox.py).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import RewardError

#: ``(completions, columns as lists, argument) -> one score per completion``.
Scorer = Callable[[Sequence[str], Mapping[str, Sequence[Any]], str | None], list[float]]

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_TOOL_TAG = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.DOTALL)


@dataclass(frozen=True)
class Builtin:
    """A built-in reward: its scorer, what its argument is (None: it takes none; a default
    when optional) and whether the argument is required."""

    scorer: Scorer
    argument: str | None = None
    default: str | None = None
    needs_column: bool = False

    def check(self, name: str, argument: str | None) -> str | None:
        """The argument to use; RewardError for a missing or needless one."""
        if self.argument is None and argument is not None:
            raise RewardError(f"builtin:{name} takes no argument (got {argument!r}).")
        if self.argument is not None and argument is None and self.default is None:
            raise RewardError(f"builtin:{name} needs {self.argument}: builtin:{name}=...")
        value = argument if argument is not None else self.default
        if name == "regex" and value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise RewardError(f"builtin:regex: invalid pattern {value!r} ({exc}).") from None
        if name == "length" and value is not None:
            _band(value)
        return value


def _normalized(text: str) -> str:
    return " ".join(text.strip().casefold().split()).rstrip(".").strip()


def _column(columns: Mapping[str, Sequence[Any]], name: str, reward: str) -> Sequence[Any]:
    if name not in columns:
        known = ", ".join(sorted(columns)) or "none"
        raise RewardError(
            f"builtin:{reward} compares with the column {name!r}, which the prompts do not "
            f"have (their columns: {known}); give it as builtin:{reward}=COLUMN."
        )
    return columns[name]


def exact(completions: Sequence[str], columns: Mapping[str, Sequence[Any]], arg: str | None):
    references = _column(columns, arg or "answer", "exact")
    return [
        float(_normalized(c) == _normalized(str(r)))
        for c, r in zip(completions, references, strict=True)
    ]


def f1(completions: Sequence[str], columns: Mapping[str, Sequence[Any]], arg: str | None):
    from ..scoring.metrics import token_f1

    references = _column(columns, arg or "answer", "f1")
    return [token_f1(c, str(r)) for c, r in zip(completions, references, strict=True)]


def regex(completions: Sequence[str], columns: Mapping[str, Sequence[Any]], arg: str | None):
    pattern = re.compile(arg or "")
    return [float(pattern.search(c) is not None) for c in completions]


def _band(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    try:
        band = (int(low), int(high))
    except ValueError:
        band = (-1, -1)
    if not sep or band[0] < 0 or band[1] < band[0] or band[1] == 0:
        raise RewardError(
            f"builtin:length takes MIN-MAX characters (e.g. length=20-200), got {text!r}."
        )
    return band


def length(completions: Sequence[str], columns: Mapping[str, Sequence[Any]], arg: str | None):
    low, high = _band(arg or "")
    scores = []
    for completion in completions:
        n = len(completion.strip())
        if low <= n <= high:
            scores.append(1.0)
        elif n < low:
            scores.append(n / low)
        else:
            scores.append(max(0.0, 1 - (n - high) / high))
    return scores


def fenced(text: str, languages: Sequence[str] = ()) -> str:
    """The first fenced code block (of one of ``languages``, or any), else the text."""
    for match in _FENCE.finditer(text):
        if not languages or match.group(1).lower() in languages or not match.group(1):
            return match.group(2)
    return text


def _json(text: str) -> Any:
    try:
        return json.loads(fenced(text, ("json",)).strip())
    except (json.JSONDecodeError, RecursionError):
        return _NOT_JSON


_NOT_JSON = object()


def valid_json(completions: Sequence[str], columns: Mapping[str, Sequence[Any]], arg: str | None):
    return [float(_json(c) is not _NOT_JSON) for c in completions]


def json_keys(completions: Sequence[str], columns: Mapping[str, Sequence[Any]], arg: str | None):
    keys = [k.strip() for k in (arg or "").split(",") if k.strip()]
    scores = []
    for completion in completions:
        value = _json(completion)
        if not isinstance(value, dict):
            scores.append(0.0)
        else:
            scores.append(sum(k in value for k in keys) / len(keys) if keys else 1.0)
    return scores


def _tool_call(text: str) -> Any:
    tagged = _TOOL_TAG.search(text)
    body = tagged.group(1) if tagged else fenced(text, ("json",)).strip()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        return None


def tool_call(completions: Sequence[str], columns: Mapping[str, Sequence[Any]], arg: str | None):
    tools = _column(columns, "tools", "tool_call")
    scores = []
    for completion, offered in zip(completions, tools, strict=True):
        call = _tool_call(completion)
        schemas = {}
        for tool in offered or []:
            schema = tool.get("function", tool) if isinstance(tool, dict) else {}
            if isinstance(schema, dict) and "name" in schema:
                schemas[schema["name"]] = schema
        if not isinstance(call, dict) or call.get("name") not in schemas:
            scores.append(0.0)
            continue
        arguments = call.get("arguments", call.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = None
        required = schemas[call["name"]].get("parameters", {}).get("required", [])
        ok = isinstance(arguments, dict) and all(name in arguments for name in required)
        scores.append(1.0 if ok else 0.5)
    return scores


def code_of(text: str) -> str:
    """The Python code of a completion: its first python (or unnamed) fenced block, else the
    whole text."""
    return fenced(text, ("python", "py", "python3"))


def code_parses(completions: Sequence[str], columns: Mapping[str, Sequence[Any]], arg: str | None):
    scores = []
    for completion in completions:
        code = code_of(completion)
        try:
            ast.parse(code)
            scores.append(float(bool(code.strip())))
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            scores.append(0.0)
    return scores


def code_tests(completions: Sequence[str], columns: Mapping[str, Sequence[Any]], arg: str | None):
    from .sandbox import run_code

    tests = _column(columns, arg or "tests", "code_tests")

    def one(pair: tuple[str, Any]) -> float:
        completion, test = pair
        return float(run_code(code_of(completion), str(test or "")).passed)

    with ThreadPoolExecutor(max_workers=2) as pool:  # child processes; the GIL is not held
        return list(pool.map(one, zip(completions, tests, strict=True)))


BUILTINS: dict[str, Builtin] = {
    "exact": Builtin(exact, "a reference column", "answer", needs_column=True),
    "f1": Builtin(f1, "a reference column", "answer", needs_column=True),
    "regex": Builtin(regex, "a pattern"),
    "length": Builtin(length, "MIN-MAX characters"),
    "json": Builtin(valid_json),
    "json_keys": Builtin(json_keys, "KEY,KEY"),
    "tool_call": Builtin(tool_call),
    "code_parses": Builtin(code_parses),
    "code_tests": Builtin(code_tests, "a tests column", "tests", needs_column=True),
}
