"""Preference data: answer pairs for DPO and ORPO, labelled answers for KTO.

Read with the readers of supervised data (``.jsonl``, ``.json``, ``.csv``, ``.parquet``, saved
datasets), checked record by record (a bad record stops with one line naming the file and the
record; ``skip_invalid`` drops and counts it), normalized to one shape, rendered through the
model's chat template (``rendering.Renderer``: the prompt exactly as the model sees it at
inference, each answer with its end of turn and EOS), split and cached.

The shapes people have, all accepted:

- paired (``preference``): ``prompt`` / ``chosen`` / ``rejected`` as strings or as message
  lists (TRL's conversational format, where ``chosen`` may also be the whole conversation);
  ``chosen`` / ``rejected`` alone as whole conversations that differ only in their last
  message (TRL's implicit prompt); ``conversations`` or ``messages`` (ShareGPT ``from/value``
  or ``role/content``) with the final assistant turn given as ``chosen`` / ``rejected``
  messages or strings (LLaMA-Factory's ranking files; ``chosen_messages`` /
  ``rejected_messages`` likewise); ``instruction`` (+ ``input``) or ``question`` (+
  ``context``) with ``chosen`` / ``rejected`` strings. An optional ``system`` string leads.
- unpaired (``kto``): a prompt in any of those forms with a ``completion`` and a boolean
  ``label`` (``kto_tag`` in LLaMA-Factory's files), or a conversation ending with the answer
  plus ``label``. KTO also trains on pairs: each becomes a desirable and an undesirable answer.

A normalized row is ``{"prompt": [messages], "chosen": str, "rejected": str}`` or
``{"prompt": [messages], "completion": str, "label": bool}`` (plus ``location``); the prompt
ends with a user turn. Rendered rows are text (TRL's "standard" format) that TRL's trainers
tokenize; the token figures in ``PreferenceStats`` are counted here with the same tokenizer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import TrainingConfig
from ..errors import DataError
from .formats import Invalid, json_type, normalize_message
from .preparation import quiet_progress, store_splits
from .readers import content_hash, read_records
from .rendering import Renderer

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

#: Pairs of a prompt with a chosen and a rejected answer (DPO, ORPO; KTO unpairs them).
PAIRED = "preference"
#: A prompt with one answer labelled desirable or not (KTO).
UNPAIRED = "kto"
#: The data formats each preference method trains on.
METHOD_FORMATS = {"dpo": (PAIRED,), "orpo": (PAIRED,), "kto": (UNPAIRED, PAIRED)}

#: Bumped whenever normalizing or rendering changes, so old caches are not reused.
PIPELINE_VERSION = 1

_PAIR_KEYS = ("chosen", "rejected", "chosen_messages", "rejected_messages")
_LABEL_KEYS = ("label", "kto_tag")
_CONVERSATION_KEYS = ("messages", "conversations")
_TRUE = ("true", "yes", "1")
_FALSE = ("false", "no", "0")


def detect_preference_format(record: Any) -> str | None:
    """``preference`` for a record with chosen/rejected answers, ``kto`` for one with a
    ``label`` (or ``kto_tag``), None for anything else (supervised data among others)."""
    if not isinstance(record, Mapping):
        return None
    if any(key in record for key in _PAIR_KEYS):
        return PAIRED
    if any(key in record for key in _LABEL_KEYS):
        return UNPAIRED
    return None


# --- normalizing one record ----------------------------------------------------------------------


def normalize_preference(record: Any, fmt: str) -> dict[str, Any]:
    """The normalized row of a ``preference`` or ``kto`` record; raises Invalid."""
    if not isinstance(record, Mapping):
        raise Invalid("not an object", f"expected a JSON object, found {json_type(record)}")
    if fmt == PAIRED:
        return _normalize_pair(record)
    return _normalize_unpaired(record)


def _normalize_pair(record: Mapping[str, Any]) -> dict[str, Any]:
    chosen_key = "chosen_messages" if "chosen_messages" in record else "chosen"
    rejected_key = "rejected_messages" if "rejected_messages" in record else "rejected"
    chosen_history, chosen = _answer(record, chosen_key)
    rejected_history, rejected = _answer(record, rejected_key)
    if chosen_history and rejected_history and chosen_history != rejected_history:
        raise Invalid(
            "mismatched conversations",
            f"{chosen_key!r} and {rejected_key!r} differ before their last message "
            "(they must share the prompt)",
        )
    prompt = _with_system(record, chosen_history or rejected_history or _prompt(record))
    if chosen.strip() == rejected.strip():
        raise Invalid("identical answers", "chosen and rejected are the same answer")
    return {"prompt": _check_prompt(prompt), "chosen": chosen, "rejected": rejected}


def _normalize_unpaired(record: Mapping[str, Any]) -> dict[str, Any]:
    label = _label(record)
    if "completion" in record:
        history, completion = _answer(record, "completion")
        prompt = history or _prompt(record)
    else:
        key = next((k for k in _CONVERSATION_KEYS if k in record), None)
        if key is None:
            raise Invalid(
                "missing field",
                "missing field 'completion' (or a conversation ending with the answer)",
            )
        prompt, completion = _answer(record, key)
    prompt = _check_prompt(_with_system(record, prompt))
    return {"prompt": prompt, "completion": completion, "label": label}


def _prompt(record: Mapping[str, Any]) -> list[dict[str, str]] | None:
    """The prompt turns from ``prompt``, a conversation, ``instruction`` or ``question``."""
    if "prompt" in record:
        value = _maybe_json(record["prompt"])
        if isinstance(value, str):
            return [{"role": "user", "content": _nonempty(value, "prompt")}]
        return _messages(value, "prompt")
    key = next((k for k in _CONVERSATION_KEYS if k in record), None)
    if key is not None:
        return _messages(record[key], key)
    for question, extra in (("instruction", "input"), ("question", "context")):
        if question in record:
            text = _nonempty(record[question], question)
            more = record.get(extra) or ""
            if not isinstance(more, str):
                raise Invalid("non-string value", f"field {extra!r} must be a string")
            return [{"role": "user", "content": f"{text}\n\n{more}" if more.strip() else text}]
    return None


def _with_system(
    record: Mapping[str, Any], prompt: list[dict[str, str]] | None
) -> list[dict[str, str]] | None:
    system = record.get("system")
    if system is None or prompt is None or prompt[0]["role"] == "system":
        return prompt
    if not isinstance(system, str):
        raise Invalid("non-string value", "field 'system' must be a string")
    return [{"role": "system", "content": system}, *prompt] if system.strip() else prompt


def _check_prompt(prompt: list[dict[str, str]] | None) -> list[dict[str, str]]:
    if not prompt:
        raise Invalid(
            "missing prompt",
            "no prompt: give 'prompt', a conversation ('messages' or 'conversations'), "
            "'instruction' or 'question', or whole conversations as chosen and rejected",
        )
    if prompt[-1]["role"] != "user":
        raise Invalid(
            "prompt not ending with a user turn",
            f"the prompt must end with a user message, not {prompt[-1]['role']}",
        )
    return prompt


def _answer(record: Mapping[str, Any], key: str) -> tuple[list[dict[str, str]] | None, str]:
    """(the turns before the answer, if given, and the answer) of an answer field: a string,
    an assistant message, or a conversation ending with one."""
    value = _maybe_json(record.get(key))
    if value is None:
        raise Invalid("missing field", f"missing field {key!r}")
    if isinstance(value, str):
        return None, _nonempty(value, key)
    messages = _messages(value, key)
    if messages[-1]["role"] != "assistant":
        raise Invalid("no assistant turn", f"{key!r} must end with an assistant (or gpt) message")
    return messages[:-1] or None, messages[-1]["content"]


def _messages(value: Any, key: str) -> list[dict[str, str]]:
    """A message or a list of messages (role/content or ShareGPT from/value) as turns."""
    value = _maybe_json(value)
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        raise Invalid(
            "malformed message",
            f"field {key!r} must be a string, a message or a list of messages, "
            f"got {json_type(value)}",
        )
    if not value:
        raise Invalid("empty field", f"field {key!r} is empty")
    try:
        turns = [normalize_message(turn, number) for number, turn in enumerate(value, 1)]
    except Invalid as exc:
        raise Invalid(exc.reason, f"{key!r}: {exc}") from None
    if any(turn["extra"] or turn["role"] == "tool" for turn in turns):
        raise Invalid(
            "tool calls",
            f"{key!r}: tool calls and tool results are not supported in preference data",
        )
    return [{"role": turn["role"], "content": turn["content"]} for turn in turns]


def _maybe_json(value: Any) -> Any:
    """Message lists kept as JSON text (CSV cells); any other string stays as it is."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        with contextlib.suppress(json.JSONDecodeError):
            parsed = json.loads(value)
            if isinstance(parsed, Mapping) or (
                isinstance(parsed, list) and all(isinstance(m, Mapping) for m in parsed)
            ):
                return parsed
    return value


def _nonempty(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise Invalid(
            "non-string value", f"field {key!r} must be a string, got {type(value).__name__}"
        )
    if not value.strip():
        raise Invalid("empty field", f"field {key!r} is empty")
    return value


def _label(record: Mapping[str, Any]) -> bool:
    key = next((k for k in _LABEL_KEYS if k in record), "label")
    value = record.get(key)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in (*_TRUE, *_FALSE):
        return value.strip().lower() in _TRUE
    shown = "missing" if value is None else repr(value)
    raise Invalid("bad label", f"field {key!r} must be true or false, got {shown}")


def canonical_preference(row: Mapping[str, Any]) -> dict[str, Any]:
    """A normalized row in its canonical keys (what quickstart writes; reads back the same)."""
    prompt = [{"role": m["role"], "content": m["content"]} for m in row["prompt"]]
    if "completion" in row:
        return {"prompt": prompt, "completion": row["completion"], "label": bool(row["label"])}
    return {"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"]}


# --- loading a file -------------------------------------------------------------------------------


@dataclass
class LoadedPreferences:
    """Validated, normalized preference records and what loading found."""

    rows: list[dict[str, Any]]
    format: str
    source: str
    content_hash: str
    records_read: int
    dropped: dict[str, int] = field(default_factory=dict)
    drop_examples: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def records(self) -> Iterator[dict[str, Any]]:
        """Each record in the canonical keys of its format."""
        for row in self.rows:
            yield canonical_preference(row)


def load_preferences(
    data: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    method: str = "dpo",
    *,
    skip_invalid: bool = False,
    digest: str | None = None,
) -> LoadedPreferences:
    """Read, validate and normalize preference data for ``method`` (dpo, orpo or kto).

    The format is detected from the first record and every other record must match it. A bad
    record raises DataError naming the file and the record; with ``skip_invalid`` bad records
    are dropped and counted by reason. No valid record left raises DataError.
    """
    allowed = METHOD_FORMATS.get(method)
    if allowed is None:
        raise DataError(f"Preference data trains dpo, orpo or kto, not {method!r}.")
    if isinstance(data, str | os.PathLike):
        name, records = os.fspath(data), read_records(Path(data).expanduser())
    else:
        name, records = "<records>", ((f"record {n}", r) for n, r in enumerate(data, 1))
    fmt: str | None = None
    first = ""
    rows: list[dict[str, Any]] = []
    dropped: Counter[str] = Counter()
    examples: dict[str, str] = {}
    read = 0
    for location, record in records:
        read += 1
        try:
            if isinstance(record, Invalid):  # a line that could not be parsed
                raise record
            if not isinstance(record, Mapping):
                raise Invalid("not an object", f"expected a JSON object, found {json_type(record)}")
            found = detect_preference_format(record)
            if fmt is None:
                fmt, first = _first_format(record, found, method, allowed), location
            elif found != fmt:
                raise Invalid("mixed formats", _mixed_message(record, found, fmt, first))
            row = normalize_preference(record, fmt)
        except Invalid as exc:
            if not skip_invalid:
                hint = " (or pass --skip-invalid to drop bad records)"
                raise DataError(f"{name}: {location}: {exc}{hint}.") from None
            dropped[exc.reason] += 1
            examples.setdefault(exc.reason, f"{location}: {exc}")
            continue
        row["location"] = location
        rows.append(row)
    if not rows:
        why = "; ".join(f"{n} {r} (e.g. {examples[r]})" for r, n in dropped.items())
        raise DataError(f"{name}: no valid preference records" + (f": {why}." if why else "."))
    assert fmt is not None
    digest = digest or content_hash(data)
    return LoadedPreferences(rows, fmt, name, digest, read, dict(dropped), examples)


def _first_format(record: Any, found: str | None, method: str, allowed: tuple[str, ...]) -> str:
    if found is None:
        keys = ", ".join(sorted(map(str, record))) if isinstance(record, Mapping) else "none"
        raise Invalid(
            "not preference data",
            f"no preference fields (keys: {keys}); {method} trains on "
            + (
                "pairs of a prompt with a chosen and a rejected answer"
                if allowed == (PAIRED,)
                else "prompts with an answer and a boolean label, or chosen/rejected pairs"
            )
            + "; supervised data trains with --method sft",
        )
    if found not in allowed:
        raise Invalid(
            "wrong format for the method",
            f"a KTO record (completion and label) but {method} needs pairs of a chosen and a "
            "rejected answer: use --method kto, or give pairs",
        )
    return found


def _mixed_message(record: Any, found: str | None, fmt: str, first: str) -> str:
    looks = f"looks like {found}" if found else "has no preference fields"
    keys = ", ".join(sorted(map(str, record))) if isinstance(record, Mapping) else "none"
    return f"record {looks} (keys: {keys}) but the data is {fmt} (detected from {first})"


# --- rendering, statistics, split and cache ----------------------------------------------------


@dataclass
class PreferenceStats:
    """What preparing preference data found (token figures counted with the model's
    tokenizer; ``samples`` are pairs for dpo/orpo, answers for kto)."""

    format: str
    method: str
    template: str
    max_length: int
    records_read: int = 0
    records_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    drop_examples: dict[str, str] = field(default_factory=dict)
    samples: int = 0
    eval_samples: int = 0
    desirable: int = 0
    undesirable: int = 0
    tokens: int = 0
    truncated: int = 0
    prompt_p50: int = 0
    prompt_max: int = 0
    answer_p50: int = 0
    answer_max: int = 0
    length_max: int = 0
    from_cache: bool = False
    cache_key: str | None = None

    @property
    def records_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def paired(self) -> bool:
        return self.method != "kto"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "records_dropped": self.records_dropped}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreferenceStats:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def summary(self) -> str:
        unit = "pairs" if self.paired else "answers"
        balance = (
            "" if self.paired else f" ({self.desirable} desirable, {self.undesirable} undesirable)"
        )
        lines = [
            f"records: {self.records_read} read, {self.records_kept} valid, "
            f"{self.records_dropped} dropped; format {self.format} for {self.method}, "
            f"template {self.template}",
            f"samples: {self.samples} {unit} train{balance}, {self.eval_samples} eval; "
            f"{self.truncated} truncated to {self.max_length} tokens",
            f"tokens: {self.tokens} per epoch; prompt p50 {self.prompt_p50}, max "
            f"{self.prompt_max}; answer p50 {self.answer_p50}, max {self.answer_max}; longest "
            f"sequence {self.length_max}",
        ]
        lines += [
            f"dropped {n}: {reason} (e.g. {self.drop_examples.get(reason, '-')})"
            for reason, n in self.dropped.items()
        ]
        return "\n".join(lines)


@dataclass
class PreparedPreferences:
    """Rendered preference data ready for a TRL trainer: ``train`` / ``eval`` with the text
    columns prompt, chosen, rejected (dpo, orpo) or prompt, completion, label (kto)."""

    train: Dataset
    eval: Dataset | None
    stats: PreferenceStats
    format: str
    packing: bool = False
    collator: Any = None  # TRL's own


def prepare_preferences(
    data: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    config: TrainingConfig,
    *,
    cache_dir: Path | None = None,
) -> PreparedPreferences:
    """Load, render, measure and split preference data for ``config.method``; with
    ``cache_dir`` the result is stored in ``cache_dir/<key>`` and a later call with the same
    data, tokenizer, template and options loads it (``stats.from_cache``)."""
    method = config.method
    renderer = Renderer(tokenizer)
    digest = content_hash(data)
    key = _cache_key(digest, renderer, config)
    entry = Path(cache_dir) / key if cache_dir is not None else None
    if entry is not None and (cached := _from_cache(entry)):
        return cached

    loaded = load_preferences(data, method, skip_invalid=config.skip_invalid, digest=digest)
    unpair = method == "kto"
    measure = _Measure(renderer, config.max_length)
    rows = measure.render(loaded, unpair)
    evaluation: list[dict[str, Any]] | None = None
    if config.eval_data_path:
        eval_loaded = load_preferences(
            config.eval_data_path, method, skip_invalid=config.skip_invalid
        )
        evaluation = _Measure(renderer, config.max_length).render(eval_loaded, unpair)
    random.Random(config.seed).shuffle(rows)  # KTO trains in order: mix the labels
    if evaluation is None and config.eval_ratio:
        held_out = max(1, round(len(rows) * config.eval_ratio))
        if held_out < len(rows):  # too little data: train on all (eval_samples 0 says so)
            evaluation, rows = rows[:held_out], rows[held_out:]
    stats = measure.stats(loaded, method, rows, evaluation)
    stats.cache_key = key if entry is not None else None
    with quiet_progress(len(rows)):
        train, eval_set = _datasets(rows), _datasets(evaluation) if evaluation else None
        if entry is not None:
            train, eval_set = store_splits(entry, train, eval_set, stats)
    return PreparedPreferences(train, eval_set, stats, loaded.format)


class _Measure:
    """Renders normalized rows to text and counts their tokens."""

    def __init__(self, renderer: Renderer, max_length: int) -> None:
        self.renderer = renderer
        self.tokenizer = renderer.tokenizer
        self.max_length = max_length
        self.prompt_lengths: list[int] = []
        self.answer_lengths: list[int] = []
        self.too_long = 0
        self.truncated = 0
        self.tokens = 0
        self.longest = 0

    def render(self, loaded: LoadedPreferences, unpair: bool) -> list[dict[str, Any]]:
        rendered = []
        for row in loaded.rows:
            where = f"{loaded.source}: {row['location']}"
            if "completion" in row:
                prompt, answer = self._split(row["prompt"], row["completion"], where)
                answers = [answer]
                out = [{"prompt": prompt, "completion": answer, "label": row["label"]}]
            else:
                prompt, chosen = self._split(row["prompt"], row["chosen"], where)
                _, rejected = self._split(row["prompt"], row["rejected"], where)
                answers = [chosen, rejected]
                out = (
                    [
                        {"prompt": prompt, "completion": chosen, "label": True},
                        {"prompt": prompt, "completion": rejected, "label": False},
                    ]
                    if unpair
                    else [{"prompt": prompt, "chosen": chosen, "rejected": rejected}]
                )
            if self._measure(prompt, answers):
                rendered += out
        return rendered

    def _split(self, prompt: list[dict[str, str]], answer: str, where: str) -> tuple[str, str]:
        """The rendered prompt (up to where the answer starts) and the rendered answer (with
        its end of turn and EOS)."""
        row = {
            "kind": "chat",
            "messages": [*prompt, {"role": "assistant", "content": answer}],
            "context": "",
            "location": where,
        }
        segments = self.renderer.segments(row)
        last = max(i for i, (_, trainable) in enumerate(segments) if trainable)
        prompt_text = "".join(text for text, _ in segments[:last])
        answer_text = segments[last][0]
        tokenizer, eos = self.tokenizer, self.renderer.eos
        if not answer_text.endswith(eos):
            answer_text += eos
        bos = getattr(tokenizer, "bos_token", None)
        # TRL's tokenization adds the BOS itself for tokenizers that add one.
        if self.renderer.bos_ids and bos and prompt_text.startswith(bos):
            prompt_text = prompt_text[len(bos) :]
        return prompt_text, answer_text

    def _measure(self, prompt: str, answers: list[str]) -> bool:
        """Count the tokens; False for a prompt that leaves no room for an answer (dropped)."""
        ids = self.tokenizer([prompt, *answers], add_special_tokens=False)["input_ids"]
        prompt_length = len(self.renderer.bos_ids) + len(ids[0])
        if prompt_length >= self.max_length:
            self.too_long += 1
            return False
        lengths = [len(answer) for answer in ids[1:]]
        self.prompt_lengths.append(prompt_length)
        self.answer_lengths += lengths
        longest = prompt_length + max(lengths)
        self.truncated += longest > self.max_length
        self.longest = max(self.longest, min(longest, self.max_length))
        self.tokens += sum(min(prompt_length + n, self.max_length) for n in lengths)
        return True

    def stats(
        self,
        loaded: LoadedPreferences,
        method: str,
        rows: list[dict[str, Any]],
        evaluation: list[dict[str, Any]] | None,
    ) -> PreferenceStats:
        dropped, examples = dict(loaded.dropped), dict(loaded.drop_examples)
        if self.too_long:
            reason = "prompt fills max_length"
            dropped[reason] = self.too_long
            examples[reason] = f"prompts of {self.max_length} tokens or more"
        if not rows:
            raise DataError(
                f"{loaded.source}: every prompt fills max_length={self.max_length} tokens, "
                "leaving no room for the answers; raise max_length or shorten the prompts."
            )
        return PreferenceStats(
            format=loaded.format,
            method=method,
            template=self.renderer.template,
            max_length=self.max_length,
            records_read=loaded.records_read,
            records_kept=len(loaded),
            dropped=dropped,
            drop_examples=examples,
            samples=len(rows),
            eval_samples=len(evaluation or []),
            desirable=sum(1 for row in rows if row.get("label") is True),
            undesirable=sum(1 for row in rows if row.get("label") is False),
            tokens=self.tokens,
            truncated=self.truncated,
            prompt_p50=_median(self.prompt_lengths),
            prompt_max=max(self.prompt_lengths),
            answer_p50=_median(self.answer_lengths),
            answer_max=max(self.answer_lengths),
            length_max=self.longest,
        )


def _median(values: list[int]) -> int:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else 0


def _datasets(rows: list[dict[str, Any]]) -> Dataset:
    from datasets import Dataset

    return Dataset.from_list(rows)


def _cache_key(digest: str, renderer: Renderer, config: TrainingConfig) -> str:
    eval_hash = content_hash(config.eval_data_path) if config.eval_data_path else None
    fields = {
        "version": PIPELINE_VERSION,
        "data": digest,
        "eval_data": eval_hash,
        "unpaired": config.method == "kto",
        "method": config.method,
        "tokenizer": renderer.fingerprint(),
        "max_length": config.max_length,
        "eval_ratio": config.eval_ratio,
        "seed": config.seed,
        "skip_invalid": config.skip_invalid,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def _from_cache(entry: Path) -> PreparedPreferences | None:
    """The cached preparation in ``entry``; None if there is none (a broken one is removed)."""
    from datasets import load_from_disk

    if not (entry / "stats.json").is_file():
        return None
    try:
        stats = PreferenceStats.from_dict(json.loads((entry / "stats.json").read_text()))
        train = load_from_disk(str(entry / "train"))
        evaluation = load_from_disk(str(entry / "eval")) if (entry / "eval").is_dir() else None
    except (OSError, ValueError, TypeError):
        shutil.rmtree(entry, ignore_errors=True)
        return None
    stats.from_cache = True
    os.utime(entry)  # most recently used: kept by pruning
    return PreparedPreferences(train, evaluation, stats, stats.format)


def preview_preferences(
    loaded: LoadedPreferences, tokenizer: PreTrainedTokenizerBase, count: int
) -> list[list[tuple[str, bool]]]:
    """The first ``count`` records as the model sees them: the prompt (not trained on), then
    each answer (trained on) with what it is."""
    measure = _Measure(Renderer(tokenizer), max_length=1 << 30)
    samples = []
    for row in loaded.rows[:count]:
        where = f"{loaded.source}: {row['location']}"
        if "completion" in row:
            prompt, answer = measure._split(row["prompt"], row["completion"], where)
            tag = "desirable" if row["label"] else "undesirable"
            samples.append([(prompt, False), (answer, True), (f"  <- {tag}", False)])
            continue
        prompt, chosen = measure._split(row["prompt"], row["chosen"], where)
        _, rejected = measure._split(row["prompt"], row["rejected"], where)
        samples.append(
            [(prompt, False), (chosen, True), ("  <- chosen; rejected: ", False), (rejected, True)]
        )
    return samples
