"""What data preparation takes and gives: its options, the prepared dataset and its
statistics (preparation.py does the work). Imports nothing heavy."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..config import TrainingConfig
from ..errors import FinetuneError
from ..methods import get_method
from .formats import resolve_format
from .loading import ReadOptions

if TYPE_CHECKING:
    from datasets import Dataset


@dataclass
class DataStats:
    """What preparation found, for the user (token figures after truncation, except the
    ``whole_p95`` / ``whole_p99`` lengths: the max_length that keeps 95 % / 99 % of the valid
    samples whole).

    ``records_read`` = ``records_kept`` (valid) + invalid records (``dropped``, by reason);
    valid records become samples, except ``truncation_dropped`` ones whose answer lay entirely
    beyond ``max_length``. ``sources`` has the counts of each source, ``warnings`` what the
    user should look at; ``method_stats`` what the method measures besides (see its
    ``statistics``).
    """

    format: str
    template: str
    max_length: int
    method: str = "sft"
    records_read: int = 0
    records_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    drop_examples: dict[str, str] = field(default_factory=dict)
    truncation_dropped: int = 0
    #: Valid records that could not be rendered as they mean, dropped with skip_invalid
    #: (counted in ``dropped`` by reason too).
    rendering_dropped: int = 0
    samples: int = 0
    eval_samples: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    truncated: int = 0
    length_p50: int = 0
    length_p90: int = 0
    length_p99: int = 0
    length_max: int = 0
    whole_p95: int = 0
    whole_p99: int = 0
    from_cache: bool = False
    cache_key: str | None = None
    sources: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    method_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def records_invalid(self) -> int:
        return sum(self.dropped.values())

    @property
    def records_dropped(self) -> int:
        """Records that became no sample: invalid ones and those lost to truncation."""
        return self.records_invalid + self.truncation_dropped

    @property
    def trainable_share(self) -> float:
        return self.trainable_tokens / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["records_invalid"] = self.records_invalid
        data["records_dropped"] = self.records_dropped
        data["trainable_share"] = round(self.trainable_share, 4)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataStats:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def summary(self) -> str:
        """A few human-readable lines (warnings last, each starting with ``warning:``)."""
        unit = _method_or_none(self.method)
        answers = unit is None or unit.answer_tokens
        why = "no answer token within" if answers else "longer than"
        lost = (
            f"; {self.truncation_dropped} dropped ({why} {self.max_length})"
            if self.truncation_dropped
            else ""
        )
        lines = [
            f"records: {self.records_read} read, {self.records_kept} valid, "
            f"{self.records_invalid} invalid; format {self.format} for {self.method}, "
            f"template {self.template}",
        ]
        if len(self.sources) > 1:
            lines += [
                f"source {s['source']}: {s['format']}, {s['read']} read, {s['valid']} valid, "
                f"{s['invalid']} invalid"
                for s in self.sources
            ]
        lines += [
            f"invalid {n}: {reason} (e.g. {self.drop_examples.get(reason, '-')})"
            for reason, n in self.dropped.items()
        ]
        noun = unit.sample_noun if unit is not None else "samples"
        trained = (
            f"{self.trainable_tokens} trained on, {self.trainable_share:.0%}"
            if answers
            else "in prompts; the answers are sampled"
        )
        lines += [
            f"{noun}: {self.samples} train, {self.eval_samples} eval{lost}; "
            f"{self.truncated} truncated to {self.max_length} tokens",
            f"tokens: {self.tokens} ({trained}); length p50 {self.length_p50}, "
            f"p90 {self.length_p90}, p99 {self.length_p99}, max {self.length_max}",
        ]
        lines += unit.stats_lines(self) if unit is not None else []
        lines += [f"warning: {warning}" for warning in self.warnings]
        return "\n".join(lines)


@dataclass
class PreparedDataset:
    """Rendered data ready for the method's trainer.

    ``train`` / ``eval`` hold the columns the method's trainer reads (supervised: input_ids,
    labels with -100 on prompt tokens, and length for length-grouped sampling; preference
    methods: TRL's text columns). ``collator`` batches them (None: the trainer's own); with
    ``packing`` it flattens a batch into one row with restarting position ids and no
    attention mask, so the model must run with ``use_cache=False`` (see PackingCollator).
    """

    train: Dataset
    eval: Dataset | None
    stats: DataStats
    format: str
    packing: bool
    collator: Callable[[list[Mapping[str, Any]]], dict[str, Any]] | None


@dataclass(frozen=True)
class PrepareOptions:
    """How data is prepared: for which method, read how, rendered how, split how."""

    method: str = "sft"
    format: str | None = None
    max_length: int = 1024
    train_on_prompt: bool = False
    packing: bool = False
    eval_ratio: float = 0.0
    eval_data: str | None = None
    seed: int = 42
    columns: dict[str, str] | None = None
    placeholders: dict[str, str] | None = None
    system_prompt: str | None = None
    skip_invalid: bool = False

    @classmethod
    def from_config(cls, config: TrainingConfig, **given: Any) -> PrepareOptions:
        """The options of ``config``; ``given`` options that are not None replace them."""
        values: dict[str, Any] = {
            "method": config.method,
            "format": config.data_format,
            "max_length": config.max_length,
            "train_on_prompt": config.train_on_prompt,
            "packing": config.packing,
            "eval_ratio": config.eval_ratio,
            "eval_data": config.eval_data_path,
            "seed": config.seed,
            "columns": config.columns,
            "placeholders": config.placeholders,
            "system_prompt": config.system_prompt,
            "skip_invalid": config.skip_invalid,
        }
        values.update({key: value for key, value in given.items() if value is not None})
        if values["eval_data"] is not None:
            values["eval_data"] = os.fspath(values["eval_data"])
        for name in ("columns", "placeholders"):
            values[name] = dict(values[name]) if values[name] else None
        values["system_prompt"] = values["system_prompt"] or None
        values["format"] = resolve_format(values["format"])
        return cls(**values)

    def read_options(self) -> ReadOptions:
        return ReadOptions(
            self.format, self.skip_invalid, self.columns, self.placeholders, self.method
        )


class _Summarizing(Protocol):
    """What a statistics summary asks of the method (methods.base.Method)."""

    @property
    def sample_noun(self) -> str: ...

    @property
    def answer_tokens(self) -> bool: ...

    def stats_lines(self, stats: DataStats) -> list[str]: ...


def _method_or_none(name: str) -> _Summarizing | None:
    """The method of a statistics record; None for one that is gone (a plugin uninstalled)."""
    try:
        return get_method(name)
    except FinetuneError:
        return None
