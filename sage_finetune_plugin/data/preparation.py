"""Preparation: render loaded data for the training method, measure it, split off eval data,
cache it all. One pipeline for every method.

``prepare_dataset`` reads the data (loading.py) for the config's method, renders every row
through the method (``Method.render``: token ids and labels for supervised fine-tuning, text
pairs for preference tuning), records statistics from the rendered columns (and warns when a
large share of samples is truncated), drops the samples that keep no answer token within
``max_length``, holds out an eval split (``eval_split``: ``eval_ratio``, seeded; or
``eval_data_path``), lets the method finish each split (``Method.finish``), and caches the
result under ``cache_dir/<key>`` (cache.py), keyed by the data's content, the tokenizer, the
template, the method and the options, so a later run loads it instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import TrainingConfig
from ..errors import DataError
from ..methods import get_method
from . import cache
from .loading import DataSource, LoadedData, load_normalized
from .prepared import DataStats, PreparedDataset, PrepareOptions
from .readers import content_hash
from .rendering import RecordError, Renderer

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from ..methods.base import Method


#: Bumped whenever rendering, tokenization or the statistics change, so old caches are not
#: reused.
PIPELINE_VERSION = 5  # 5: normalized rows carry "extra" (prompt records)

#: Below this many rows, datasets' progress bars are hidden (they would only be noise).
PROGRESS_MIN_ROWS = 10_000

#: From this many rows on, rendering runs in one process per core (two at most; below it,
#: starting the processes costs more than it saves).
PARALLEL_MIN_ROWS = 20_000
MAX_PROCESSES = 2

#: Share of truncated samples from which preparation warns (and names a max_length that keeps
#: 95 % of the samples whole).
TRUNCATION_WARNING_SHARE = 0.10


def prepare_dataset(
    data: LoadedData | DataSource,
    tokenizer: PreTrainedTokenizerBase,
    config: TrainingConfig | None = None,
    *,
    cache_dir: Path | None = None,
    origin: LoadedData | None = None,
    **options: Any,
) -> PreparedDataset:
    """Render training data for the method, split off eval data, cache the result.

    ``data`` is a LoadedData, or what ``load_training_data`` reads (paths, a folder, a glob,
    a dataset id, records). The options come from ``config`` (TrainingConfig defaults when
    None); keyword arguments override them: ``method``, ``format``, ``max_length``,
    ``train_on_prompt``, ``packing``, ``eval_ratio``, ``eval_data``, ``seed``, ``columns``,
    ``placeholders``, ``system_prompt`` (opens every conversation without a system message)
    and ``skip_invalid`` (see ``PrepareOptions``; the reading ones apply to ``eval_data``
    too). ``origin``: the data as first read, when ``data`` is a canonical copy of it (what
    quickstart writes); the record counts, sources and warnings are reported from it. With
    ``cache_dir``, the result is stored in ``cache_dir/<key>`` and a later call with the same
    data content, tokenizer, template, method and options loads it instead
    (``stats.from_cache``).
    """
    prepare = PrepareOptions.from_config(config or TrainingConfig(), **options)
    if prepare.max_length < 2:
        raise DataError(f"max_length must be at least 2 tokens, got {prepare.max_length}.")
    if not 0 <= prepare.eval_ratio < 1:
        raise DataError(f"eval_ratio must be in [0, 1), got {prepare.eval_ratio}.")
    unit = get_method(prepare.method)
    renderer = Renderer(
        tokenizer,
        max_length=prepare.max_length,
        train_on_prompt=prepare.train_on_prompt,
        system_prompt=prepare.system_prompt,
    )
    digest = data.content_hash if isinstance(data, LoadedData) else content_hash(data)
    key = _cache_key(digest, renderer, prepare, unit)
    entry = Path(cache_dir) / key if cache_dir is not None else None
    collator = unit.collator(tokenizer, prepare.packing)
    if entry is not None and (cached := cache.load(entry)) is not None:
        train, evaluation, saved = cached
        stats = DataStats.from_dict(saved)
        stats.from_cache = True
        return PreparedDataset(train, evaluation, stats, stats.format, prepare.packing, collator)

    loaded = (
        data
        if isinstance(data, LoadedData)
        else load_normalized(data, prepare.read_options(), digest)
    )
    if origin is not None and len(origin) == len(loaded):  # errors name the user's records
        locations = origin.dataset["location"]
        loaded.dataset = loaded.dataset.remove_columns("location").add_column("location", locations)
    with quiet_progress(len(loaded)):
        rendered = _render(loaded, unit, renderer, key, prepare.skip_invalid)
        stats = _statistics(origin or loaded, rendered, renderer, prepare)
        kept = _kept(rendered, stats)
        train, evaluation = _split(_samples(kept), prepare, unit, renderer, key)
        stats.method_stats = unit.statistics(kept.data, train)
        stats.samples, stats.eval_samples = len(train), len(evaluation or [])
        stats.cache_key = key if entry is not None else None
        if entry is not None:
            train, evaluation = cache.store(entry, train, evaluation, stats.to_dict())
    return PreparedDataset(train, evaluation, stats, loaded.format, prepare.packing, collator)


def _cache_key(digest: str, renderer: Renderer, options: PrepareOptions, unit: Method) -> str:
    eval_hash = content_hash(options.eval_data) if options.eval_data else None
    fields = {
        "version": PIPELINE_VERSION,
        "data": digest,
        "eval_data": eval_hash,
        "tokenizer": renderer.fingerprint(),
        "method_fields": unit.cache_fields(options),
        **{
            k: v
            for k, v in dataclasses.asdict(options).items()
            if k not in ("packing", "eval_data", "train_on_prompt")
        },
    }
    return cache.cache_key(fields)


#: Why a rendered row was dropped with skip_invalid ("" for a row that rendered), and the
#: record's problem: the statistics count them with the records that did not validate.
INVALID_COLUMNS = ("_invalid", "_invalid_example")


class _RenderBatch:
    """The ``Dataset.map`` function: a batch of normalized rows through the method. With
    ``skip_invalid`` a record that cannot be rendered as it means (``RecordError``) becomes an
    empty row marked with the reason, which the statistics count and preparation drops."""

    def __init__(self, unit: Method, renderer: Renderer, skip_invalid: bool) -> None:
        self.unit, self.renderer, self.skip_invalid = unit, renderer, skip_invalid

    def __call__(self, batch: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
        rows = [
            dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)
        ]
        try:
            out = self.unit.render(self.renderer, rows)
            return {**out, **{name: [""] * len(rows) for name in INVALID_COLUMNS}}
        except RecordError:
            if not self.skip_invalid:
                raise
        parts = [self._one(row) for row in rows]  # find the records that fail
        return {name: [value for part in parts for value in part[name]] for name in parts[0]}

    def _one(self, row: dict[str, Any]) -> dict[str, list[Any]]:
        try:
            out = self.unit.render(self.renderer, [row])
            return {**out, "_invalid": [""], "_invalid_example": [""]}
        except RecordError as exc:
            empty = {name: [_empty(feature)] for name, feature in self.unit.features().items()}
            return {**empty, "_invalid": [exc.reason], "_invalid_example": [exc.detail]}


def _empty(feature: Any) -> Any:
    """A value of ``feature``'s type that stands for nothing (0, "", False, [])."""
    dtype = getattr(feature, "dtype", None)
    if dtype is None:
        return []
    return "" if dtype == "string" else False if dtype == "bool" else 0


def _render(
    loaded: LoadedData, unit: Method, renderer: Renderer, key: str, skip_invalid: bool
) -> Dataset:
    from datasets import Value

    processes = min(MAX_PROCESSES, os.cpu_count() or 1, len(loaded))
    features = unit.features().copy()
    features.update({name: Value("string") for name in INVALID_COLUMNS})
    return loaded.dataset.map(
        _RenderBatch(unit, renderer, skip_invalid),
        batched=True,
        batch_size=1000,
        num_proc=processes if len(loaded) >= PARALLEL_MIN_ROWS and processes > 1 else None,
        remove_columns=loaded.dataset.column_names,
        features=features,
        load_from_cache_file=False,
        new_fingerprint=f"{key}-{loaded.content_hash[:16]}",
        desc="Rendering",
    )


def _kept(rendered: Dataset, stats: DataStats) -> Dataset:
    """The rendered rows that keep an answer token within max_length (and rendered)."""
    if not stats.truncation_dropped and not stats.rendering_dropped:
        return rendered
    return rendered.filter(lambda n: n > 0, input_columns="_trainable")


def _samples(rendered: Dataset) -> Dataset:
    """The rendered rows without the columns kept for the statistics (named ``_...``)."""
    return rendered.remove_columns([c for c in rendered.column_names if c.startswith("_")])


def _statistics(
    loaded: LoadedData, rendered: Dataset, renderer: Renderer, options: PrepareOptions
) -> DataStats:
    """Statistics of the samples that keep an answer token (``rendered`` holds every valid
    record; ``loaded`` gives the record counts)."""
    import numpy as np

    table = rendered.data  # the Arrow columns, read at once (not row by row)
    full_lengths, trainable, all_lengths, tokens = (
        table.column(name).to_numpy().astype(np.int64)
        for name in ("_full_length", "_trainable", "_length", "_tokens")
    )
    dropped, examples = dict(loaded.dropped), dict(loaded.drop_examples)
    reasons = table.column("_invalid").to_pylist()
    invalid = np.array([bool(reason) for reason in reasons])
    for reason, example in zip(reasons, table.column("_invalid_example").to_pylist(), strict=True):
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            examples.setdefault(reason, example)
    kept = trainable > 0
    if not kept.any() and invalid.all():
        why = "; ".join(f"{n} {r} (e.g. {examples[r]})" for r, n in dropped.items())
        raise DataError(f"{loaded.source}: no valid training records: {why}.")
    if not kept.any():
        raise DataError(
            f"{loaded.source}: every sample lost all its answer tokens to truncation at "
            f"max_length={options.max_length}; raise max_length or shorten the prompts."
        )
    lengths = all_lengths[kept]
    p50, p90, p99 = (int(np.percentile(lengths, q)) for q in (50, 90, 99))
    valid_lengths = full_lengths[~invalid]
    whole_p95, whole_p99 = (int(np.percentile(valid_lengths, q, method="higher")) for q in (95, 99))
    warnings = list(loaded.warnings)
    too_long = int((valid_lengths > options.max_length).sum())
    if too_long / len(valid_lengths) >= TRUNCATION_WARNING_SHARE:
        warnings.append(
            f"{too_long} of {len(valid_lengths)} samples ({too_long / len(valid_lengths):.0%}) "
            f"are longer than max_length {options.max_length} and lose their end; max_length "
            f"{whole_p95} would keep 95% of them whole (max_length={whole_p95})"
        )
    return DataStats(
        format=loaded.format,
        template=renderer.template,
        max_length=options.max_length,
        method=options.method,
        records_read=loaded.records_read,
        records_kept=len(loaded) - int(invalid.sum()),
        dropped=dropped,
        drop_examples=examples,
        truncation_dropped=int((~kept & ~invalid).sum()),
        rendering_dropped=int(invalid.sum()),
        tokens=int(tokens[kept].sum()),
        trainable_tokens=int(trainable[kept].sum()),
        truncated=int((full_lengths[kept] > options.max_length).sum()),
        length_p50=p50,
        length_p90=p90,
        length_p99=p99,
        length_max=int(lengths.max()),
        whole_p95=whole_p95,
        whole_p99=whole_p99,
        sources=list(loaded.sources),
        warnings=warnings,
    )


def _split(
    samples: Dataset, options: PrepareOptions, unit: Method, renderer: Renderer, key: str
) -> tuple[Dataset, Dataset | None]:
    """The training split and the evaluation split (``eval_data``, or ``eval_ratio`` of the
    samples), each finished by the method."""
    evaluation: Dataset | None = None
    if options.eval_data:
        read = options.read_options()
        loaded = load_normalized(options.eval_data, read, content_hash(options.eval_data))
        rendered = _render(loaded, unit, renderer, f"{key}-eval", options.skip_invalid)
        evaluation = _samples(rendered.filter(lambda n: n > 0, input_columns="_trainable"))
        train = samples
    elif (positions := eval_split(len(samples), options.eval_ratio, options.seed)) is not None:
        train, evaluation = samples.select(positions[0]), samples.select(positions[1])
    else:
        train = samples
    train = unit.finish(train, options, train=True)
    if evaluation is not None:
        evaluation = unit.finish(evaluation, options, train=False)
    return train, evaluation


def eval_split(count: int, eval_ratio: float, seed: int) -> tuple[list[int], list[int]] | None:
    """The (train, eval) positions of the split ``prepare_dataset`` makes of ``count``
    rendered samples, for every method: a seeded shuffle, ``eval_ratio`` of them (at least
    one) held out. None when nothing is held out: no ratio, or too little data to hold any out
    (a preset's eval_ratio on a handful of records trains on everything; stats.eval_samples ==
    0 then tells the user there was no eval). `sage finetune eval` finds the held-out rows
    with it."""
    from datasets import Dataset

    if not eval_ratio:
        return None
    held_out = max(1, round(count * eval_ratio))
    if held_out >= count:
        return None
    positions = Dataset.from_dict({"position": list(range(count))})
    parts = positions.train_test_split(test_size=held_out, seed=seed, shuffle=True)
    return list(parts["train"]["position"]), list(parts["test"]["position"])


def preview_samples(
    loaded: LoadedData,
    tokenizer: PreTrainedTokenizerBase,
    count: int,
    *,
    method: str = "sft",
    max_length: int | None = None,
    train_on_prompt: bool = False,
    system_prompt: str | None = None,
) -> list[list[tuple[str, bool]]]:
    """The first ``count`` samples as the model sees them for ``method``: (text, trained on)
    pieces (supervised: decoded token runs after truncation)."""
    renderer = Renderer(
        tokenizer,
        max_length=max_length,
        train_on_prompt=train_on_prompt,
        system_prompt=system_prompt,
    )
    rows = list(loaded.dataset.select(range(min(count, len(loaded)))))
    return get_method(method).preview(renderer, rows) if rows else []


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
