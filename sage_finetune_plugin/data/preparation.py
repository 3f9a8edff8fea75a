"""Preparation: tokenize loaded data with prompt masking, split off eval data, cache it all.

``prepare_dataset`` renders and tokenizes every row (rendering.py), records statistics (and
warns when a large share of samples is truncated), holds out an eval split (``eval_ratio``,
seeded, or ``eval_data_path``), and caches the result under ``cache_dir/<key>``
(datasets.save_to_disk, written atomically), keyed by the data's content, the tokenizer, the
template and the options, so a later run loads it instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import TrainingConfig
from ..errors import DataError
from ..paths import atomic_directory
from .collators import make_collator
from .formats import resolve_format
from .loading import DataSource, LoadedData, ReadOptions, load_normalized
from .readers import content_hash
from .rendering import Renderer

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase


#: Bumped whenever rendering or tokenization changes, so old caches are not reused.
PIPELINE_VERSION = 2


#: Below this many rows, datasets' progress bars are hidden (they would only be noise).
PROGRESS_MIN_ROWS = 10_000


#: From this many rows on, rendering and tokenizing run in one process per core (two at
#: most; below it, starting the processes costs more than it saves).
PARALLEL_MIN_ROWS = 20_000
MAX_PROCESSES = 2

#: Prepared datasets kept per cache directory (the most recently written ones).
CACHE_ENTRIES_KEPT = 3

#: Share of truncated samples from which preparation warns (and names a max_length that keeps
#: ``WHOLE_SHARE`` of the samples whole).
TRUNCATION_WARNING_SHARE = 0.10
WHOLE_SHARE = 0.95


@dataclass
class DataStats:
    """What preparation found, for the user (all token figures after truncation).

    ``records_read`` = ``records_kept`` (valid) + invalid records (``dropped``, by reason);
    valid records become samples, except ``truncation_dropped`` ones whose answer lay entirely
    beyond ``max_length``. ``sources`` has the counts of each source, ``warnings`` what the
    user should look at.
    """

    format: str
    template: str
    max_length: int
    records_read: int = 0
    records_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    drop_examples: dict[str, str] = field(default_factory=dict)
    truncation_dropped: int = 0
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
    sources: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

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
        lost = (
            f"; {self.truncation_dropped} dropped (no answer token within {self.max_length})"
            if self.truncation_dropped
            else ""
        )
        lines = [
            f"records: {self.records_read} read, {self.records_kept} valid, "
            f"{self.records_invalid} invalid; format {self.format}, template {self.template}",
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
        lines += [
            f"samples: {self.samples} train, {self.eval_samples} eval{lost}; "
            f"{self.truncated} truncated to {self.max_length} tokens",
            f"tokens: {self.tokens} ({self.trainable_tokens} trained on, "
            f"{self.trainable_share:.0%}); length p50 {self.length_p50}, p90 {self.length_p90}, "
            f"p99 {self.length_p99}, max {self.length_max}",
        ]
        lines += [f"warning: {warning}" for warning in self.warnings]
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
    columns: dict[str, str] | None
    placeholders: dict[str, str] | None
    system_prompt: str | None

    def read_options(self, skip_invalid: bool) -> ReadOptions:
        return ReadOptions(self.format, skip_invalid, self.columns, self.placeholders)


def prepare_dataset(
    data: LoadedData | DataSource,
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
    columns: Mapping[str, str] | None = None,
    placeholders: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    origin: LoadedData | None = None,
) -> PreparedDataset:
    """Tokenize training data with prompt masking, split off eval data, cache the result.

    ``data`` is a LoadedData, or what ``load_training_data`` reads (paths, a folder, a glob,
    a dataset id, records); ``format``, ``skip_invalid``, ``columns`` and ``placeholders``
    apply to reading it and ``eval_data``. ``system_prompt`` opens every conversation without
    a system message. Explicit keyword arguments override ``config`` (TrainingConfig defaults
    when None). ``origin``: the data as first read, when ``data`` is a canonical copy of it
    (what quickstart writes); the record counts, sources and warnings are reported from it.
    With ``cache_dir``, the result is stored in ``cache_dir/<key>`` and a later call with the
    same data content, tokenizer, template and options loads it instead of tokenizing again
    (``stats.from_cache``).
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
        columns=dict(columns if columns is not None else config.columns or {}) or None,
        placeholders=dict(placeholders if placeholders is not None else config.placeholders or {})
        or None,
        system_prompt=(system_prompt if system_prompt is not None else config.system_prompt)
        or None,
    )
    if options.max_length < 2:
        raise DataError(f"max_length must be at least 2 tokens, got {options.max_length}.")
    if not 0 <= options.eval_ratio < 1:
        raise DataError(f"eval_ratio must be in [0, 1), got {options.eval_ratio}.")
    renderer = Renderer(
        tokenizer,
        max_length=options.max_length,
        train_on_prompt=options.train_on_prompt,
        system_prompt=options.system_prompt,
    )
    digest = data.content_hash if isinstance(data, LoadedData) else content_hash(data)
    key = _cache_key(digest, renderer, options, skip_invalid)
    entry = Path(cache_dir) / key if cache_dir is not None else None
    if entry is not None and (cached := _from_cache(entry, tokenizer, options)):
        return cached

    loaded = (
        data
        if isinstance(data, LoadedData)
        else load_normalized(data, options.read_options(skip_invalid), digest)
    )
    if origin is not None and len(origin) == len(loaded):  # errors name the user's records
        locations = origin.dataset["location"]
        loaded.dataset = loaded.dataset.remove_columns("location").add_column("location", locations)
    with quiet_progress(len(loaded)):
        tokenized = _tokenize(loaded, renderer, key, keep_empty=True)
        stats = _statistics(origin or loaded, tokenized, renderer, options)
        if stats.truncation_dropped:
            tokenized = tokenized.filter(lambda n: n > 0, input_columns="trainable")
        tokenized = tokenized.remove_columns(["trainable", "full_length"])
        train, evaluation = _split(tokenized, options, renderer, skip_invalid, key)
        stats.samples, stats.eval_samples = len(train), len(evaluation or [])
        stats.cache_key = key if entry is not None else None
        if entry is not None:
            train, evaluation = store_splits(entry, train, evaluation, stats)
    return PreparedDataset(
        train,
        evaluation,
        stats,
        loaded.format,
        options.packing,
        make_collator(tokenizer, options.packing),
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


def _tokenize(
    loaded: LoadedData, renderer: Renderer, key: str, keep_empty: bool = False
) -> Dataset:
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
    processes = min(MAX_PROCESSES, os.cpu_count() or 1, len(loaded))
    return loaded.dataset.map(
        renderer.tokenize_batch,
        batched=True,
        batch_size=1000,
        num_proc=processes if len(loaded) >= PARALLEL_MIN_ROWS and processes > 1 else None,
        fn_kwargs={"keep_empty": keep_empty},
        remove_columns=loaded.dataset.column_names,
        features=features,
        load_from_cache_file=False,
        new_fingerprint=f"{key}-{loaded.content_hash[:16]}",
        desc="Tokenizing",
    )


def _statistics(
    loaded: LoadedData, tokenized: Dataset, renderer: Renderer, options: _Options
) -> DataStats:
    """Statistics of the samples that keep an answer token (``tokenized`` holds every valid
    record; ``loaded`` gives the record counts)."""
    import numpy as np

    table = tokenized.data  # the Arrow columns, read at once (not row by row)
    full_lengths, trainable, all_lengths = (
        table.column(name).to_numpy().astype(np.int64)
        for name in ("full_length", "trainable", "length")
    )
    kept = trainable > 0
    if not kept.any():
        raise DataError(
            f"{loaded.source}: every sample lost all its answer tokens to truncation at "
            f"max_length={options.max_length}; raise max_length or shorten the prompts."
        )
    lengths = all_lengths[kept]
    p50, p90, p99 = (int(np.percentile(lengths, q)) for q in (50, 90, 99))
    warnings = list(loaded.warnings)
    too_long = int((full_lengths > options.max_length).sum())
    if too_long / len(full_lengths) >= TRUNCATION_WARNING_SHARE:
        whole = int(np.percentile(full_lengths, WHOLE_SHARE * 100, method="higher"))
        warnings.append(
            f"{too_long} of {len(full_lengths)} samples ({too_long / len(full_lengths):.0%}) "
            f"are longer than max_length {options.max_length} and lose their end; max_length "
            f"{whole} would keep {WHOLE_SHARE:.0%} of them whole (--max-length {whole})"
        )
    return DataStats(
        format=loaded.format,
        template=renderer.template,
        max_length=options.max_length,
        records_read=loaded.records_read,
        records_kept=len(loaded),
        dropped=dict(loaded.dropped),
        drop_examples=dict(loaded.drop_examples),
        truncation_dropped=int((~kept).sum()),
        tokens=int(lengths.sum()),
        trainable_tokens=int(trainable[kept].sum()),
        truncated=int((full_lengths[kept] > options.max_length).sum()),
        length_p50=p50,
        length_p90=p90,
        length_p99=p99,
        length_max=int(lengths.max()),
        sources=list(loaded.sources),
        warnings=warnings,
    )


def _split(
    tokenized: Dataset, options: _Options, renderer: Renderer, skip_invalid: bool, key: str
) -> tuple[Dataset, Dataset | None]:
    if options.eval_data:
        read = options.read_options(skip_invalid)
        loaded = load_normalized(options.eval_data, read, content_hash(options.eval_data))
        evaluation = _tokenize(loaded, renderer, f"{key}-eval")
        return tokenized, evaluation.remove_columns(["trainable", "full_length"])
    positions = eval_split(len(tokenized), options.eval_ratio, options.seed)
    if positions is None:
        return tokenized, None
    train, held_out = positions
    return tokenized.select(train), tokenized.select(held_out)


def eval_split(count: int, eval_ratio: float, seed: int) -> tuple[list[int], list[int]] | None:
    """The (train, eval) positions of the split ``prepare_dataset`` makes of ``count``
    tokenized samples: a seeded shuffle, ``eval_ratio`` of them (at least one) held out. None
    when nothing is held out: no ratio, or too little data to hold any out (a preset's
    eval_ratio on a handful of records trains on everything; stats.eval_samples == 0 then
    tells the user there was no eval). `sage finetune eval` finds the held-out rows with it."""
    from datasets import Dataset

    if not eval_ratio:
        return None
    held_out = max(1, round(count * eval_ratio))
    if held_out >= count:
        return None
    positions = Dataset.from_dict({"position": list(range(count))})
    parts = positions.train_test_split(test_size=held_out, seed=seed, shuffle=True)
    return list(parts["train"]["position"]), list(parts["test"]["position"])


def store_splits(
    entry: Path, train: Dataset, evaluation: Dataset | None, stats: Any
) -> tuple[Dataset, Dataset | None]:
    """Save prepared splits and their statistics (anything with ``to_dict()``) in the cache
    entry, atomically (another process storing the same key first wins); prune old entries;
    reload from the saved copy (so the data is memory-mapped from the cache)."""
    from datasets import load_from_disk

    with atomic_directory(entry) as building:
        train.save_to_disk(str(building / "train"))
        if evaluation is not None:
            evaluation.save_to_disk(str(building / "eval"))
        (building / "stats.json").write_text(json.dumps(stats.to_dict(), indent=2) + "\n")
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
        train,
        evaluation,
        stats,
        stats.format,
        options.packing,
        make_collator(tokenizer, options.packing),
    )


@contextlib.contextmanager
def quiet_progress(rows: int) -> Iterator[None]:
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
