"""Reward functions for reinforcement learning (GRPO): built-in ones and the user's own.

A reward is named by text, in the config's ``rewards`` and on the command line (``--reward``):

- ``builtin:NAME`` or ``builtin:NAME=ARGUMENT``: one of ``builtins.BUILTINS`` (everything
  after the first ``=`` is the argument, so a regular expression may hold ``=`` and commas);
- ``FILE.py:FUNCTION``: a function in a Python file, called as TRL calls reward functions:
  ``FUNCTION(prompts, completions, **columns) -> list[float]``, where ``prompts`` are the
  prompts as the model saw them, ``completions`` the generated texts and ``columns`` the
  prompt records' other columns (``answer=[...]``, one value per completion).

``load_rewards`` turns the names into ``Reward`` callables that TRL's GRPOTrainer takes. A file
that does not import, a missing function, a function that raises, returns the wrong number of
rewards or something that is not a number is a ``RewardError``: one line naming the file, the
function and the record. Imports nothing heavy.
"""

from __future__ import annotations

import importlib.util
import json
import math
import numbers
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RewardError
from .builtins import BUILTINS, Builtin

BUILTIN_PREFIX = "builtin:"
#: Dataset columns of the GRPO rows that are not the prompt: the record's other columns (JSON)
#: and where it came from. TRL hands every column to the rewards.
COLUMNS_FIELD = "columns"
LOCATION_FIELD = "location"


@dataclass
class Reward:
    """One reward function as TRL calls it: ``reward(prompts, completions, **kwargs)``."""

    spec: str
    #: Its name in the metrics (``rewards/<name>/mean``) and the progress bar.
    name: str
    #: How a message names it: ``builtin:regex`` or ``rewards.py:function``.
    label: str
    builtin: Builtin | None = None
    argument: str | None = None
    function: Callable[..., Any] | None = None

    @property
    def __name__(self) -> str:  # TRL names the reward's metrics by it
        return self.name

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> list[float]:
        columns, locations = unpack_columns(kwargs, len(completions))
        return self.score(list(prompts), [_text(c) for c in completions], columns, locations)

    def score(
        self,
        prompts: list[Any],
        completions: list[str],
        columns: Mapping[str, list[Any]],
        locations: Sequence[str],
    ) -> list[float]:
        """One reward per completion; RewardError naming the record that failed."""
        try:
            values = self._call(prompts, completions, columns)
        except RewardError:
            raise
        except Exception as exc:  # the user's code: any error is theirs to fix
            where = self._failing_record(prompts, completions, columns, locations)
            raise RewardError(
                f"Reward {self.label} raised {type(exc).__name__}: {_first_line(exc)} "
                f"(on {where}); fix the function, or drop the reward."
            ) from None
        return self._checked(values, len(completions), locations)

    def _call(
        self, prompts: list[Any], completions: list[str], columns: Mapping[str, list[Any]]
    ) -> Any:
        if self.builtin is not None:
            return self.builtin.scorer(completions, columns, self.argument)
        assert self.function is not None
        return self.function(prompts, completions, **columns)

    def _failing_record(
        self,
        prompts: list[Any],
        completions: list[str],
        columns: Mapping[str, list[Any]],
        locations: Sequence[str],
    ) -> str:
        """The first record whose completion alone makes the reward fail."""
        for i, location in enumerate(locations):
            one = {key: [values[i]] for key, values in columns.items()}
            try:
                self._call([prompts[i]], [completions[i]], one)
            except Exception:
                return location
        return f"a batch of {len(completions)} completions from {locations[0]}"

    def _checked(self, values: Any, expected: int, locations: Sequence[str]) -> list[float]:
        where = locations[0] if locations else "the first batch"
        if not isinstance(values, list | tuple):
            raise RewardError(
                f"Reward {self.label} returned {type(values).__name__}, not a list of floats "
                f"(on a batch from {where}): return one float per completion."
            )
        if len(values) != expected:
            raise RewardError(
                f"Reward {self.label} returned {len(values)} rewards for {expected} "
                f"completions (on a batch from {where}): return one float per completion."
            )
        scores = []
        for i, value in enumerate(values):
            if value is None:  # TRL's convention: this reward does not apply here
                scores.append(math.nan)
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy too
                raise RewardError(
                    f"Reward {self.label} returned {value!r} for the completion of "
                    f"{locations[i] if i < len(locations) else where}: rewards are numbers."
                )
            scores.append(float(value))
        return scores


def unpack_columns(kwargs: Mapping[str, Any], count: int) -> tuple[dict[str, list[Any]], list[str]]:
    """The records' own columns as lists (from the JSON column of the GRPO rows), and where
    each record came from."""
    rows = [json.loads(text or "{}") for text in kwargs.get(COLUMNS_FIELD) or []]
    locations = [str(x) for x in kwargs.get(LOCATION_FIELD) or []] or ["a record"] * count
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return {key: [row.get(key) for row in rows] for key in keys}, locations


def _text(completion: Any) -> str:
    """A completion as text (TRL's conversational completions are message lists)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def resolve_specs(specs: Sequence[str], base: Path | None = None) -> list[str]:
    """The specs with each file made absolute (relative to ``base``, default: the current
    directory), so that a task runs them from anywhere."""
    resolved = []
    for spec in specs:
        spec = spec.strip()
        if spec.startswith(BUILTIN_PREFIX) or ":" not in spec:
            resolved.append(spec)
            continue
        path, _, function = spec.rpartition(":")
        full = (base or Path.cwd()) / Path(path).expanduser()
        resolved.append(f"{full.resolve()}:{function}")
    return resolved


def load_rewards(specs: Sequence[str]) -> list[Reward]:
    """The rewards named by ``specs`` (see the module docstring); RewardError for the first
    that cannot be used."""
    if not specs:
        raise RewardError(
            "GRPO needs at least one reward: name one as builtin:NAME[=ARGUMENT] or "
            "FILE.py:FUNCTION in the task's rewards (docs/rl.md lists the built-ins)."
        )
    rewards = [_load(spec.strip()) for spec in specs]
    seen: dict[str, int] = {}
    for reward in rewards:  # unique metric names: regex, regex_2, ...
        seen[reward.name] = seen.get(reward.name, 0) + 1
        if seen[reward.name] > 1:
            reward.name = f"{reward.name}_{seen[reward.name]}"
    return rewards


def _load(spec: str) -> Reward:
    if spec.startswith(BUILTIN_PREFIX):
        name, sep, argument = spec.removeprefix(BUILTIN_PREFIX).partition("=")
        name = name.strip()
        if name not in BUILTINS:
            raise RewardError(
                f"Unknown built-in reward {spec!r}: choose one of "
                f"{', '.join(BUILTIN_PREFIX + n for n in BUILTINS)}."
            )
        builtin = BUILTINS[name]
        value = builtin.check(name, argument if sep else None)
        return Reward(spec, name, f"{BUILTIN_PREFIX}{name}", builtin=builtin, argument=value)
    path_text, sep, function_name = spec.rpartition(":")
    if not sep or not path_text or not function_name.isidentifier():
        raise RewardError(
            f"Reward {spec!r} is neither builtin:NAME[=ARGUMENT] nor FILE.py:FUNCTION."
        )
    path = Path(path_text).expanduser()
    label = f"{path.name}:{function_name}"
    if not path.is_file():
        raise RewardError(f"Reward {spec}: {path} is not a file.")
    module = _import(path, label)
    function = getattr(module, function_name, None)
    if function is None:
        found = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise RewardError(
            f"Reward {label}: {path} has no function {function_name!r} (it defines "
            f"{', '.join(found) or 'no functions'})."
        )
    if not callable(function):
        raise RewardError(f"Reward {label}: {function_name} is not a function.")
    return Reward(spec, function_name, label, function=function)


def _import(path: Path, label: str) -> Any:
    name = f"_sage_rewards_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RewardError(f"Reward {label}: cannot import {path} (not a Python file?).")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: report its error in one line
        sys.modules.pop(name, None)
        where = ""
        if isinstance(exc, SyntaxError) and exc.lineno:
            where = f" at line {exc.lineno}"
        raise RewardError(
            f"Reward {label}: {path} does not import{where}: {type(exc).__name__}: "
            f"{_first_line(exc)}."
        ) from None
    return module
