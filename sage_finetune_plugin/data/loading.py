"""Loading: read the sources, validate and normalize every record, keep them memory-mapped.

``load_training_data`` streams records from each source through the format validator of the
training method into an Arrow file that datasets memory-maps, so memory does not grow with the
data. Each source's format is detected from its first record (among the formats the method
reads) or forced, and every record of it must match; a bad record stops with one line naming
the source and the record, or is dropped and counted with ``skip_invalid``. Records of a kind
the method does not train on (preference pairs for supervised fine-tuning, instructions for
DPO) and media always stop it. Sources in different chat formats are combined as
conversations.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import DataError
from ..methods import get_method
from .formats import (
    Invalid,
    Unsupported,
    Validator,
    canonical_record,
    combined_format,
    normalized_features,
    placeholder_warning,
    resolve_format,
)
from .readers import content_hash, is_records, resolve_sources

if TYPE_CHECKING:
    from datasets import Dataset

DataSource = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Sequence[Mapping[str, Any]]


class WrongFormat(DataError):
    """Records of one format where another was forced (``--format`` or a task type):
    ``where`` names the record, ``detail`` the fields expected and found."""

    def __init__(self, where: str, detail: str, *, expected: str, found: str) -> None:
        super().__init__(
            f"{where}: {detail}: force data_format={found}, or let the format be detected."
        )
        self.where = where
        self.detail = detail
        self.expected = expected
        self.found = found


@dataclass(frozen=True)
class ReadOptions:
    """How records are read: for which training method, a forced format, dropping bad records,
    column names, placeholders."""

    format: str | None = None
    skip_invalid: bool = False
    columns: Mapping[str, str] | None = None
    placeholders: Mapping[str, str] | None = None
    method: str = "sft"


@dataclass
class LoadedData:
    """Validated, normalized records (memory-mapped) and what loading found.

    ``dataset`` has the columns of a normalized row (see ``formats``); ``records()`` gives
    them back in the canonical spelling of ``format``.
    ``dropped`` counts invalid records by reason; ``sources`` has one entry per source
    (``source``, ``format``, ``read``, ``valid``, ``invalid``); ``warnings`` says what the
    user should look at (placeholders left in the text).
    """

    dataset: Dataset
    format: str
    source: str
    content_hash: str
    records_read: int
    dropped: dict[str, int] = field(default_factory=dict)
    drop_examples: dict[str, str] = field(default_factory=dict)
    sources: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def records_dropped(self) -> int:
        """Records dropped as invalid (read = valid + dropped)."""
        return sum(self.dropped.values())

    def records(self) -> Iterator[dict[str, Any]]:
        """Each record in the canonical keys of its format (what quickstart writes)."""
        for row in self.dataset:
            yield canonical_record(self.format, row)


def load_training_data(
    path: DataSource,
    format: str | None = None,
    *,
    skip_invalid: bool = False,
    columns: Mapping[str, str] | None = None,
    placeholders: Mapping[str, str] | None = None,
    method: str = "sft",
) -> LoadedData:
    """Read, validate and normalize training data for the training ``method``.

    ``path`` is a ``.jsonl``, ``.json`` (a list, or an object holding one list), ``.csv``,
    ``.parquet`` or ``.txt`` file (one text sample per blank-line-separated block), a folder of
    such files or a directory written by ``datasets.save_to_disk``, a glob, a Hugging Face
    dataset id (``org/name[:split]``), a list of these (read in order), or a list of records.
    Each source's format (for sft: alpaca, qa, conversation, prompt_completion, text; for dpo
    and orpo: preference; for kto: kto or preference) is detected from its first record and
    every other record must match it, unless ``format`` forces one.
    ``columns`` maps fields to the names a file uses (``{"output": "response"}``; ``role`` and
    ``content`` for the keys of conversation turns); ``placeholders`` fills ``{{KEY}}`` in the
    text. A bad record raises DataError naming it; with ``skip_invalid`` bad records are
    dropped and counted by reason instead. Records of a format the method does not read, and
    multimodal records, are refused in any case. No valid record left raises DataError.

    JSONL, CSV, Parquet and text files are read one record at a time and the normalized
    records go to an Arrow file that is memory-mapped, so memory does not grow with the data.
    A ``.json`` array is parsed whole: use JSONL for large data.
    """
    options = ReadOptions(resolve_format(format), skip_invalid, columns, placeholders, method)
    return load_normalized(path, options, content_hash(path))


def load_normalized(path: DataSource, options: ReadOptions, digest: str) -> LoadedData:
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter
    from datasets.fingerprint import get_temporary_cache_files_directory

    if is_records(path):
        records = ((f"record {n}", r) for n, r in enumerate(path, 1))  # type: ignore[arg-type]
        sources: list[tuple[str, Iterator[tuple[str, Any]], bool]] = [("<records>", records, False)]
    else:
        found = resolve_sources(path)  # type: ignore[arg-type]
        sources = [(source.name, source.records(), True) for source in found]
    name = sources[0][0] if len(sources) == 1 else ", ".join(s[0] for s in sources)
    dropped: Counter[str] = Counter()
    examples: dict[str, str] = {}
    per_source: list[dict[str, Any]] = []
    warnings: list[str] = []
    reader = get_method(options.method).reader
    # datasets removes its temporary cache directory when the process ends; until then the
    # normalized file stays valid for everything derived from it (map, shuffle, ...).
    workdir = tempfile.mkdtemp(prefix="normalized-", dir=get_temporary_cache_files_directory())
    arrow_file = os.path.join(workdir, "normalized.arrow")
    try:
        with ArrowWriter(features=normalized_features(), path=arrow_file) as writer:
            for source_name, source_records, named in sources:
                validator = Validator(reader, options.format, options.columns, options.placeholders)
                read = invalid = 0
                for location, record in source_records:
                    read += 1
                    try:
                        row = _normalize(validator, record, location, source_name, options)
                    except Invalid as exc:  # only with skip_invalid
                        invalid += 1
                        dropped[exc.reason] += 1
                        prefix = f"{source_name}: " if len(sources) > 1 else ""
                        examples.setdefault(exc.reason, f"{prefix}{location}: {exc}")
                        continue
                    row["location"] = f"{source_name}: {location}" if named else location
                    writer.write(row)
                per_source.append(
                    {
                        "source": source_name,
                        "format": validator.format or "",
                        "read": read,
                        "valid": read - invalid,
                        "invalid": invalid,
                    }
                )
                if validator.unfilled:
                    example = f"{source_name}: {validator.unfilled_example}"
                    warnings.append(
                        placeholder_warning(validator.unfilled, validator.unfilled_records, example)
                    )
            writer.finalize()
        dataset = Dataset.from_file(arrow_file)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    formats = {s["source"]: s["format"] for s in per_source if s["format"]}
    loaded = LoadedData(
        dataset,
        combined_format(formats) if formats else "",
        name,
        digest,
        sum(s["read"] for s in per_source),
        dict(dropped),
        examples,
        per_source,
        warnings,
    )
    if not len(dataset):
        why = "; ".join(f"{n} {r} (e.g. {examples[r]})" for r, n in dropped.items())
        raise DataError(f"{name}: no valid training records" + (f": {why}." if why else "."))
    return loaded


def _normalize(
    validator: Validator, record: Any, location: str, source: str, options: ReadOptions
) -> dict[str, Any]:
    """The normalized row; DataError for a record that stops loading, Invalid for one that
    ``skip_invalid`` drops."""
    try:
        if isinstance(record, Invalid):  # a line that could not be parsed
            raise record
        return validator.normalize(record, location)
    except Unsupported as exc:
        raise DataError(f"{source}: {location}: {exc.message(source)}.") from None
    except Invalid as exc:
        if options.skip_invalid:
            raise
        if exc.looks_like is not None and validator.forced:
            raise WrongFormat(
                f"{source}: {location}",
                str(exc),
                expected=validator.format or "",
                found=exc.looks_like,
            ) from None
        hint = " (or pass skip_invalid=True to drop bad records)"
        raise DataError(f"{source}: {location}: {exc}{hint}.") from None
