"""Quickstart: a task directory ready for ``run``, from a Python code base or the user's data.

``quickstart`` writes ``<root>/<task>/`` (``data/train.jsonl``, ``training_config.json``,
``finetune_meta.json`` and the tokenized-data cache) in a hidden folder next to it and renames
it into place at the end, so a failure never leaves half a task or loses the old one. The
user's data (one or several sources) is validated and written once, in the canonical keys of
its format, to ``data/train.jsonl``; how it was read (column names, placeholders) and the
default system prompt go into the training config, so ``run`` and ``chat`` use them too.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import TrainingConfig
from .data import (
    CodeDataset,
    DataStats,
    LoadedData,
    WrongFormat,
    build_code_dataset,
    load_training_data,
    prepare_dataset,
    preview_samples,
)
from .errors import DataError, ModelError, TaskError, UsageProblem
from .locks import RunLock
from .meta import TaskMeta, save_meta
from .paths import (
    CONFIG_FILE,
    DATASET_FILE,
    META_FILENAME,
    PREPARED_CACHE,
    atomic_directory,
    new_task_dir,
)
from .presets import PresetConfigs

#: Task types and the data format each expects (None: detected).
TASK_TYPES: dict[str, str | None] = {
    "code": "alpaca",
    "qa": "qa",
    "instruction": "alpaca",
    "chat": "conversation",
    "custom": None,
    "preference": None,  # pairs or KTO records, for dpo, orpo or kto: see _quickstart_preference
}
#: The task type of preference data (its data layer is data/preference.py).
PREFERENCE_TASK = "preference"

#: The task type to suggest for data of each format.
_TASK_FOR_FORMAT = {"alpaca": "instruction", "qa": "qa", "conversation": "chat"}

DataArgument = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


@dataclass
class QuickstartResult:
    """The task quickstart wrote and what it found on the way."""

    task_dir: Path
    meta: TaskMeta
    config: TrainingConfig
    records_read: int
    records_kept: int
    dropped: dict[str, int]
    stats: DataStats | None
    code: CodeDataset | None = None
    preview: list[list[tuple[str, bool]]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    replaced: bool = False


def quickstart(
    task_type: str,
    *,
    data: DataArgument | None = None,
    source: str | os.PathLike[str] | None = None,
    name: str | None = None,
    data_format: str | None = None,
    skip_invalid: bool = False,
    model: str | None = None,
    preset: str = "auto",
    force: bool = False,
    root: str | os.PathLike[str] | None = None,
    preview: int = 0,
    on_status: Callable[[str], None] | None = None,
    columns: Mapping[str, str] | None = None,
    placeholders: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    max_length: int | None = None,
    method: str | None = None,
) -> QuickstartResult:
    """Create ``<root>/<name>`` (default name: the task type) ready for ``sage finetune run``.

    ``code`` builds its data from ``source`` (default: the current directory); the other
    types read ``data``: a file, a folder, a glob, a Hugging Face dataset id, or a list of
    these, combined in order (``qa``, ``instruction`` and ``chat`` force their format unless
    ``data_format`` is given; ``custom`` detects it per source). ``columns`` maps fields to the
    names the files use, ``placeholders`` fills ``{{KEY}}`` in the text, ``system_prompt`` opens
    every conversation without a system message (in training and in ``chat``), ``max_length``
    overrides the preset's. The model's tokenizer, when it can be loaded, tokenizes the data
    once: that fills the statistics, the warnings, the preview and the cache that ``run``
    reuses. An existing task is replaced only with ``force``. ``on_status`` receives progress
    lines. ``preference``
    reads preference pairs or KTO records for ``method`` (dpo, orpo or kto; default dpo).
    """
    if task_type == PREFERENCE_TASK:
        if source is not None or data_format is not None:
            raise UsageProblem("--source and --format are not for `quickstart preference`.")
        return _quickstart_preference(
            data,
            method or "dpo",
            name,
            skip_invalid,
            model,
            preset,
            force,
            root,
            preview,
            on_status,
        )
    if method is not None:
        raise UsageProblem("--method is for `quickstart preference` (dpo, orpo or kto).")
    _check_arguments(task_type, data, source, data_format, columns, placeholders)
    target = new_task_dir(name or task_type, root)
    replacing = _check_target(target, force)
    config = PresetConfigs.auto(model) if preset == "auto" else PresetConfigs.get(preset)
    model_name = model or config.model_name

    code = build_code_dataset(source or ".") if task_type == "code" else None
    if code is not None:
        loaded = load_training_data(code.records, "alpaca")
        loaded.warnings.clear()  # "{{...}}" in source code is code (f-strings), not a placeholder
    else:
        assert data is not None
        loaded = _load(task_type, data, data_format, skip_invalid, columns, placeholders)
    config = config.replace(
        model_name=model_name,
        data_path=DATASET_FILE,
        output_dir=".",
        data_format=loaded.format,
        columns=dict(columns) if columns else None,
        placeholders=dict(placeholders) if placeholders else None,
        system_prompt=system_prompt or None,
        **({"max_length": max_length} if max_length is not None else {}),
    )
    # Replacing a task: hold its run lock, so that it cannot be trained while it is replaced.
    with (
        RunLock(target) if replacing else contextlib.nullcontext(),
        atomic_directory(target, replace=replacing) as building,
    ):
        _write_data(building, loaded, config)
        if on_status is not None:
            on_status(f"Tokenizing {len(loaded)} records for {config.model_name}")
        stats, samples, warnings = _tokenize_once(building, loaded, config, preview)
        meta = _write_meta(building, task_type, config, loaded, stats, _data_file(data), code)
    return QuickstartResult(
        task_dir=target,
        meta=meta,
        config=config,
        records_read=loaded.records_read,
        records_kept=len(loaded),
        dropped=loaded.dropped,
        stats=stats,
        code=code,
        preview=samples,
        warnings=warnings,
        replaced=replacing,
    )


def _check_arguments(
    task_type: str,
    data: Any,
    source: Any,
    data_format: str | None,
    columns: Any,
    placeholders: Any,
) -> None:
    if task_type not in TASK_TYPES:
        raise UsageProblem(
            f"Unknown task type {task_type!r}: choose one of {', '.join(TASK_TYPES)}."
        )
    if task_type == "code":
        if data is not None or data_format is not None or columns or placeholders:
            raise UsageProblem(
                "quickstart code builds its data from --source (--data, --format, --columns "
                "and --replace are for your own data: `quickstart custom --data FILE`)."
            )
    elif data is None:
        raise UsageProblem(f"quickstart {task_type} needs --data FILE (your training data).")
    elif source is not None:
        raise UsageProblem("--source is for `quickstart code` only.")


def _load(
    task_type: str,
    data: DataArgument,
    data_format: str | None,
    skip_invalid: bool,
    columns: Mapping[str, str] | None,
    placeholders: Mapping[str, str] | None,
) -> LoadedData:
    """The user's data, read as the task type asks; records of another format are refused
    with the task type that fits them."""
    try:
        return load_training_data(
            data,
            data_format or TASK_TYPES[task_type],
            skip_invalid=skip_invalid,
            columns=columns,
            placeholders=placeholders,
        )
    except WrongFormat as exc:
        if data_format is not None:
            raise
        fits = _TASK_FOR_FORMAT.get(exc.found)
        instead = f"`quickstart {fits}` or `quickstart custom`" if fits else "`quickstart custom`"
        raise DataError(
            f"{exc.where}: {exc.detail}: `quickstart {task_type}` reads {exc.expected} data; "
            f"for {exc.found} data use {instead} (which detects the format)."
        ) from None


def _data_file(data: DataArgument | None) -> str | None:
    """What the meta's ``data_file`` records: the one source the user named (a path resolved,
    a dataset id or a glob as given); None for several (``data_stats.sources`` lists them)."""
    if data is None:
        return None
    items = [data] if isinstance(data, str | os.PathLike) else list(data)
    if len(items) != 1:
        return None
    path = Path(items[0]).expanduser()
    return str(path.resolve()) if path.exists() else os.fspath(items[0])


def _check_target(target: Path, force: bool) -> bool:
    """Whether an existing task will be replaced; refuses unless ``force`` (and never a folder
    that is not a task)."""
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return False
    if not force:
        raise TaskError(
            f"Task {target.name!r} already exists at {target}; pass --force to replace it "
            "or --name to choose another name."
        )
    if not (target / META_FILENAME).is_file():
        raise TaskError(
            f"{target} exists and is not a task directory (no {META_FILENAME}); "
            "refusing to replace it. Choose another --name or --root."
        )
    return True


def _write_data(folder: Path, loaded: LoadedData, config: TrainingConfig) -> None:
    dataset = folder / DATASET_FILE
    dataset.parent.mkdir(parents=True)
    with dataset.open("w", encoding="utf-8") as handle:
        for record in loaded.records():
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    config.save(folder / CONFIG_FILE)


def _tokenize_once(
    folder: Path, loaded: LoadedData, config: TrainingConfig, preview: int
) -> tuple[DataStats | None, list[list[tuple[str, bool]]], list[str]]:
    """Statistics (records as read from the user's data), preview samples and warnings; the
    tokenized data lands in the task's cache, where ``run`` finds it."""
    from .models import load_tokenizer

    try:
        tokenizer = load_tokenizer(config.model_name, trust_remote_code=config.trust_remote_code)
    except ModelError as exc:
        return None, [], [*loaded.warnings, f"Token statistics and preview skipped: {exc}"]
    stats = prepare_dataset(
        folder / DATASET_FILE,
        tokenizer,
        config,
        cache_dir=folder / PREPARED_CACHE,
        origin=loaded,
    ).stats
    samples = preview_samples(
        loaded,
        tokenizer,
        preview,
        max_length=config.max_length,
        train_on_prompt=config.train_on_prompt,
        system_prompt=config.system_prompt,
    )
    return stats, samples, []


def _write_meta(
    folder: Path,
    task_type: str,
    config: TrainingConfig,
    loaded: LoadedData,
    stats: DataStats | None,
    data_file: str | None,
    code: CodeDataset | None,
) -> TaskMeta:
    if stats is not None:
        data_stats, samples = stats.to_dict(), stats.samples + stats.eval_samples
    else:
        data_stats = {
            "records_read": loaded.records_read,
            "records_kept": len(loaded),
            "records_invalid": loaded.records_dropped,
            "dropped": loaded.dropped,
            "sources": loaded.sources,
            "warnings": loaded.warnings,
        }
        samples = len(loaded)
    if code is not None:
        data_stats["code"] = code.to_dict()
    meta = TaskMeta(
        task_type=task_type,
        model=config.model_name,
        framework="peft",
        format=loaded.format,
        dataset=DATASET_FILE,
        config=CONFIG_FILE,
        output_dir=".",
        code_root=str(code.source) if code else None,
        data_file=data_file,
        preset=config.preset,
        num_samples=samples,
        data_stats=data_stats,
        training=config.to_dict(),
        status="prepared",
    )
    return save_meta(folder, meta)


# --- preference tasks (DPO, ORPO, KTO) --------------------------------------------------------


def _quickstart_preference(
    data: DataArgument | None,
    method: str,
    name: str | None,
    skip_invalid: bool,
    model: str | None,
    preset: str,
    force: bool,
    root: str | os.PathLike[str] | None,
    preview: int,
    on_status: Callable[[str], None] | None,
) -> QuickstartResult:
    """A task that trains ``method`` on preference data, laid out as the others (its data in
    canonical preference records, the rendered data in the task's cache)."""
    from .config import PREFERENCE_METHODS
    from .data.preference import load_preferences, prepare_preferences, preview_preferences
    from .models import load_tokenizer
    from .paths import PREFERENCE_CACHE
    from .runs import fit_method

    sources = [] if data is None else [data] if isinstance(data, str | os.PathLike) else list(data)
    if not sources:
        raise UsageProblem(
            "quickstart preference needs --data FILE: prompt/chosen/rejected pairs, or "
            "prompt/completion/label records for kto."
        )
    if len(sources) > 1:
        raise UsageProblem(
            "quickstart preference reads one --data file; combine the preference files first."
        )
    if method not in PREFERENCE_METHODS:
        raise UsageProblem(f"--method must be one of {', '.join(PREFERENCE_METHODS)}.")
    target = new_task_dir(name or PREFERENCE_TASK, root)
    replacing = _check_target(target, force)
    config = PresetConfigs.auto(model) if preset == "auto" else PresetConfigs.get(preset)
    loaded = load_preferences(sources[0], method, skip_invalid=skip_invalid)
    config, notes = fit_method(
        config.replace(
            model_name=model or config.model_name,
            data_path=DATASET_FILE,
            output_dir=".",
            data_format=loaded.format,
            method=method,
            packing=False,
        )
    )
    stats, samples, warnings = None, [], list(notes)
    # The preference records stand in for LoadedData in _write_data and _write_meta (records(),
    # format, records_read, dropped), as their statistics do for DataStats.
    with (
        RunLock(target) if replacing else contextlib.nullcontext(),
        atomic_directory(target, replace=replacing) as building,
    ):
        _write_data(building, loaded, config)
        try:
            tokenizer = load_tokenizer(
                config.model_name, trust_remote_code=config.trust_remote_code
            )
        except ModelError as exc:
            warnings.append(f"Token statistics and preview skipped: {exc}")
        else:
            if on_status is not None:
                on_status(f"Rendering {len(loaded)} records for {config.model_name}")
            cache = building / PREFERENCE_CACHE
            prepared = prepare_preferences(
                building / DATASET_FILE, tokenizer, config, cache_dir=cache
            )
            stats = prepared.stats
            stats.records_read = loaded.records_read
            stats.dropped = {**loaded.dropped, **stats.dropped}
            stats.drop_examples = {**loaded.drop_examples, **stats.drop_examples}
            samples = preview_preferences(loaded, tokenizer, preview)
        meta = _write_meta(building, PREFERENCE_TASK, config, loaded, stats, _data_file(data), None)
    return QuickstartResult(
        task_dir=target,
        meta=meta,
        config=config,
        records_read=loaded.records_read,
        records_kept=len(loaded),
        dropped=loaded.dropped,
        stats=stats,
        preview=samples,
        warnings=warnings,
        replaced=replacing,
    )
