"""Quickstart: a task directory ready for ``run``, from a Python code base or the user's data.

``quickstart`` writes ``<root>/<task>/`` (``data/train.jsonl``, ``training_config.json``,
``finetune_meta.json`` and the rendered-data cache) in a hidden folder next to it and renames
it into place at the end, so a failure never leaves half a task or loses the old one. The
user's data (one or several sources) is read for the task's training method, validated and
written once, in the canonical keys of its format, to ``data/train.jsonl``; how it was read
(column names, placeholders) and the default system prompt go into the training config, so
``run`` and ``chat`` use them too. Every task type goes the same way; they differ in the data
formats they accept and the method they train by default.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import TrainingConfig, flags
from .errors import DataError, FinetuneError, ModelError, TaskError, UsageProblem
from .locks import RunLock
from .meta import TaskMeta, TaskStatus, save_meta
from .methods import get_method
from .paths import (
    CONFIG_FILE,
    DATASET_FILE,
    META_FILENAME,
    PREPARED_CACHE,
    atomic_directory,
    new_task_dir,
    remove_tree,
)
from .presets import PresetConfigs
from .progress import Status

if TYPE_CHECKING:
    from .data import CodeDataset, DataStats, LoadedData

DataArgument = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]

#: A max_length chosen from the data keeps this share of the samples whole, rounded up to a
#: multiple of ``LENGTH_STEP`` tokens.
KEEP_WHOLE = 0.99
LENGTH_STEP = 64


@dataclass(frozen=True)
class TaskType:
    """A kind of task: the data formats it accepts (None: whatever its method reads; one
    format: forced unless ``data_format`` says otherwise), the method it trains by default,
    and what it is, for ``--help``."""

    formats: tuple[str, ...] | None
    description: str
    method: str = "sft"
    #: Its data is built from a code base (``source``), not read from the user's files.
    source: bool = False


TASK_TYPES: dict[str, TaskType] = {
    "code": TaskType(
        ("alpaca", "prompts"),
        "questions and answers derived from a Python code base (grpo: functions to write, "
        "scored by their doctests)",
        source=True,
    ),
    "qa": TaskType(("qa",), "question/answer records"),
    "instruction": TaskType(("alpaca",), "alpaca instruction/input/output records"),
    "chat": TaskType(("conversation",), "conversations (messages or ShareGPT)"),
    "custom": TaskType(None, "any format the method reads, detected"),
    "preference": TaskType(
        ("preference", "kto"), "chosen/rejected pairs or KTO records", method="dpo"
    ),
    "rl": TaskType(("prompts",), "prompts, scored by reward functions (--reward)", method="grpo"),
}
#: The task type of preference data.
PREFERENCE_TASK = "preference"


@dataclass(frozen=True)
class QuickstartOptions:
    """What a new task is made of.

    ``task_type`` is a key of ``TASK_TYPES``; ``data`` the user's data (a file, a folder, a
    glob, a Hugging Face dataset id, or a list of these, combined in order), ``source`` the
    code base of a ``code`` task (default: the current directory). ``settings`` are training
    config keys for the task (``model_name``, ``method``, ``max_length``, ``data_format``,
    ``columns``, ``placeholders``, ``system_prompt``, ``skip_invalid``: malformed records, and
    records that cannot be rendered as they mean, are dropped and counted). ``preset``: a
    hardware preset, ``auto`` the largest that fits this machine for the model. ``preview``:
    how many samples to show as the model sees them.
    """

    task_type: str
    data: DataArgument | None = None
    source: str | os.PathLike[str] | None = None
    name: str | None = None
    preset: str = "auto"
    force: bool = False
    root: str | os.PathLike[str] | None = None
    preview: int = 0
    settings: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, task_type: str, **values: Any) -> QuickstartOptions:
        """Options from keywords: this class's fields, and the settings by their Python
        keywords (``model``, ``method``, ``max_length``, ``data_format``, ``columns``,
        ``placeholders``, ``system_prompt``, ``skip_invalid``: each setting's ``Flag.keyword``)."""
        settings = dict(values.pop("settings", None) or {})
        for key, flag in flags("quickstart"):
            if flag.keyword is not None and flag.keyword in values:
                value = values.pop(flag.keyword)
                if value is not None and value is not False:
                    settings[key] = value
        return cls(task_type, settings=settings, **values)

    @property
    def kind(self) -> TaskType:
        if self.task_type not in TASK_TYPES:
            raise UsageProblem(
                f"Unknown task type {self.task_type!r}: choose one of {', '.join(TASK_TYPES)}."
            )
        return TASK_TYPES[self.task_type]

    @property
    def method(self) -> str:
        return str(self.settings.get("method") or self.kind.method)


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
    #: What the method changed in the settings to train with them (``Method.fit``).
    notes: list[str] = field(default_factory=list)


def quickstart(
    task: str | QuickstartOptions, /, *, status: Status | None = None, **values: Any
) -> QuickstartResult:
    """Create ``<root>/<name>`` (default name: the task type) ready for ``sage finetune run``.

    ``task`` is a QuickstartOptions, or a task type with the options as keywords (see
    ``QuickstartOptions.of``). ``code`` builds its data from ``source``; the other types read
    ``data`` for the task's method (``qa``, ``instruction`` and ``chat`` force their format
    unless ``data_format`` is given; ``custom`` detects it per source; ``preference`` reads
    pairs or KTO records, for dpo by default). The model's tokenizer, when it can be loaded,
    renders the data once: that fills the statistics, the warnings, the preview and the cache
    that ``run`` reuses. An existing task is replaced only with ``force``. ``status`` receives
    progress lines.
    """
    from .data import build_code_dataset, load_training_data
    from .data.code import CODE_REWARDS, build_code_prompts

    say = status or (lambda _line: None)
    options = task if isinstance(task, QuickstartOptions) else QuickstartOptions.of(task, **values)
    _check_options(options)
    target = new_task_dir(options.name or options.task_type, options.root)
    replacing = _check_target(target, options.force)
    settings = dict(options.settings)
    skip_invalid = bool(settings.get("skip_invalid", False))  # recorded: `run` reads alike
    model = settings.pop("model_name", None)
    for key in ("method", "data_format"):  # set from the options and from the data read
        settings.pop(key, None)
    preset = (
        PresetConfigs.auto(model) if options.preset == "auto" else PresetConfigs.get(options.preset)
    )

    code = None
    unit = get_method(options.method)
    if options.kind.source:
        say(f"Scanning Python files under {Path(options.source or '.').expanduser().resolve()}")
        if "prompts" in unit.formats:  # functions to write, scored by the code rewards
            code = build_code_prompts(options.source or ".")
            settings.setdefault("rewards", list(CODE_REWARDS))
            loaded = load_training_data(code.records, "prompts", method=options.method)
        else:
            code = build_code_dataset(options.source or ".")
            loaded = load_training_data(code.records, "alpaca")
        loaded.warnings.clear()  # "{{...}}" in source code is code (f-strings), not a placeholder
    else:
        assert options.data is not None
        loaded = _load(options, skip_invalid)
    config, notes = unit.fit(
        preset.replace(
            **settings,
            model_name=model or preset.model_name,
            data_path=DATASET_FILE,
            output_dir=".",
            method=options.method,
            data_format=loaded.format,
        )
    )
    unit.validate(config)  # what the method cannot train (GRPO: rewards that do not load)
    # Replacing a task: hold its run lock, so that it cannot be trained while it is replaced.
    with (
        RunLock(target) if replacing else contextlib.nullcontext(),
        atomic_directory(target, replace=replacing) as building,
    ):
        _write_data(building, loaded, config)
        say(f"Rendering {len(loaded)} records for {config.model_name}")
        stats, samples, warnings = _render_once(building, loaded, config, options.preview)
        if stats is not None and "max_length" not in options.settings:
            length, why = choose_max_length(config, stats)
            say(why)
            if length != config.max_length:  # render again at that length, in its place
                if stats.cache_key:
                    remove_tree(building / PREPARED_CACHE / stats.cache_key)
                config = config.replace(max_length=length)
                config.save(building / CONFIG_FILE)
                stats, samples, warnings = _render_once(building, loaded, config, options.preview)
        meta = _write_meta(building, options.task_type, config, loaded, stats, options.data, code)
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
        notes=notes,
    )


def choose_max_length(config: TrainingConfig, stats: DataStats) -> tuple[int, str]:
    """The max_length a new task trains with when none was given, and why (one line): the
    length that keeps ``KEEP_WHOLE`` of its samples whole, rounded up to a multiple of
    ``LENGTH_STEP``, at most what the preset allows (``PresetInfo.longest``; a config of no
    preset: its own max_length) and what the memory estimate says fits this machine."""
    info = PresetConfigs.INFO.get(config.preset or "")
    longest = info.longest if info is not None else config.max_length
    allowed = f"the {info.name} preset allows up to {longest}" if info else f"at most {longest}"
    wanted = stats.whole_p99
    length = min(-(-wanted // LENGTH_STEP) * LENGTH_STEP, longest)
    if length > config.max_length and (fitting := _fitting_length(config, length)) < length:
        length, allowed = fitting, f"{fitting} is the most that fits in this machine's memory"
    if length >= wanted:
        return length, (
            f"max_length {length}, from the data: it keeps {KEEP_WHOLE:.0%} of the samples "
            f"whole ({allowed}); pass max_length=N for another"
        )
    return length, (
        f"max_length {length}: {KEEP_WHOLE:.0%} of the samples would need {wanted} tokens, "
        f"but {allowed}"
    )


def _fitting_length(config: TrainingConfig, length: int) -> int:
    """``length``, or the longest multiple of ``LENGTH_STEP`` down to the config's own
    max_length whose memory estimate fits this machine (the estimate's model must be found)."""
    from .models import model_config
    from .training.memory import available_memory, estimate_memory, fits
    from .training.runtime import measured_hardware

    try:  # the model's configuration, the machine and its memory, read once
        architecture = model_config(config.model_name, trust_remote_code=config.trust_remote_code)
        hardware = measured_hardware(config)
        available: int | None = None
        while length > config.max_length:
            estimate = estimate_memory(
                config.replace(max_length=length), model_config=architecture, hardware=hardware
            )
            available = available or available_memory(estimate.device, hardware)
            if fits(estimate, available):
                return length
            length -= LENGTH_STEP
    except FinetuneError:
        return length
    return max(length, config.max_length)


def _check_options(options: QuickstartOptions) -> None:
    kind, settings = options.kind, options.settings
    unit = get_method(options.method)
    if kind.formats is not None and not set(kind.formats) & set(unit.formats):
        fits = [
            name
            for name, other in TASK_TYPES.items()
            if other.formats is None or set(other.formats) & set(unit.formats)
        ]
        raise UsageProblem(
            f"quickstart {options.task_type} reads {', '.join(kind.formats)} data, which "
            f"{unit.name} does not train on: use the task type {' or '.join(fits)}, or another "
            "method."
        )
    if kind.source:
        if options.data is not None or any(
            settings.get(key) for key in ("data_format", "columns", "placeholders")
        ):
            raise UsageProblem(
                "quickstart code builds its data from source=DIR (data=FILE, data_format=NAME, "
                "columns={FIELD: COLUMN} and placeholders={KEY: VALUE} are for your own data: "
                "`quickstart custom --data FILE`)."
            )
    elif options.data is None or (
        not isinstance(options.data, str | os.PathLike) and not list(options.data)
    ):
        raise UsageProblem(
            f"quickstart {options.task_type} needs data=FILE (your training data: "
            f"{kind.description})."
        )
    elif options.source is not None:
        raise UsageProblem("source=DIR is for `quickstart code` only.")


def _load(options: QuickstartOptions, skip_invalid: bool) -> LoadedData:
    """The user's data, read as the task type and its method ask; records of another format
    are refused with the task type that fits them."""
    from .data import WrongFormat, load_training_data

    settings, kind = options.settings, options.kind
    data_format = settings.get("data_format")
    forced = data_format or (kind.formats[0] if kind.formats and len(kind.formats) == 1 else None)
    assert options.data is not None
    try:
        return load_training_data(
            options.data,
            forced,
            skip_invalid=skip_invalid,
            columns=settings.get("columns"),
            placeholders=settings.get("placeholders"),
            method=options.method,
        )
    except WrongFormat as exc:
        if data_format is not None:
            raise
        fits = [
            name
            for name, other in TASK_TYPES.items()
            if other.formats == (exc.found,) and not other.source
        ]
        instead = " or ".join(f"`quickstart {name}`" for name in [*fits, "custom"])
        raise DataError(
            f"{exc.where}: {exc.detail}: `quickstart {options.task_type}` reads {exc.expected} "
            f"data; for {exc.found} data use {instead} (which detects the format)."
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
            f"Task {target.name!r} already exists at {target}; pass force=True to replace it "
            "or choose another name."
        )
    if not (target / META_FILENAME).is_file():
        raise TaskError(
            f"{target} exists and is not a task directory (no {META_FILENAME}); "
            "refusing to replace it. Choose another name or root."
        )
    return True


def _write_data(folder: Path, loaded: LoadedData, config: TrainingConfig) -> None:
    dataset = folder / DATASET_FILE
    dataset.parent.mkdir(parents=True)
    with dataset.open("w", encoding="utf-8") as handle:
        for record in loaded.records():
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    config.save(folder / CONFIG_FILE)


def _render_once(
    folder: Path, loaded: LoadedData, config: TrainingConfig, preview: int
) -> tuple[DataStats | None, list[list[tuple[str, bool]]], list[str]]:
    """Statistics (records as read from the user's data), preview samples and warnings; the
    rendered data lands in the task's cache, where ``run`` finds it."""
    from .data import prepare_dataset, preview_samples
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
        method=config.method,
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
    data: DataArgument | None,
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
        data_file=_data_file(data),
        preset=config.preset,
        num_samples=samples,
        data_stats=data_stats,
        training=config.to_dict(),
        status=TaskStatus.PREPARED,
    )
    return save_meta(folder, meta)
