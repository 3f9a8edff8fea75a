"""Loading: read a source, validate and normalize every record, keep them memory-mapped.

``load_training_data`` streams records from a reader through the format validator into an
Arrow file that datasets memory-maps, so memory does not grow with the file. The format is
detected from the first record (or forced) and every record must match it; a bad record stops
with one line naming it, or is dropped and counted with ``skip_invalid``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DataError
from .formats import Invalid, Validator, canonical_record, resolve_format
from .readers import content_hash, read_records

if TYPE_CHECKING:
    from datasets import Dataset


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
            yield canonical_record(self.format, row)


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
    return load_normalized(path, resolve_format(format), skip_invalid, content_hash(path))


def load_normalized(
    path: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    forced: str | None,
    skip_invalid: bool,
    digest: str,
) -> LoadedData:
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter
    from datasets.fingerprint import get_temporary_cache_files_directory

    if isinstance(path, str | os.PathLike):
        name, records = os.fspath(path), read_records(Path(path).expanduser())
    else:
        name, records = "<records>", ((f"record {n}", r) for n, r in enumerate(path, 1))
    validator = Validator(forced)
    dropped: Counter[str] = Counter()
    examples: dict[str, str] = {}
    read = 0
    # datasets removes its temporary cache directory when the process ends; until then the
    # normalized file stays valid for everything derived from it (map, shuffle, ...).
    workdir = tempfile.mkdtemp(prefix="normalized-", dir=get_temporary_cache_files_directory())
    arrow_file = os.path.join(workdir, "normalized.arrow")
    try:
        with ArrowWriter(features=normalized_features(), path=arrow_file) as writer:
            for location, record in records:
                read += 1
                try:
                    if isinstance(record, Invalid):  # a line that could not be parsed
                        raise record
                    writer.write(validator.normalize(record, location))
                except Invalid as exc:
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


def normalized_features() -> Any:
    from datasets import Features, List, Value

    return Features(
        {
            "kind": Value("string"),
            "messages": List({"role": Value("string"), "content": Value("string")}),
            "context": Value("string"),
            "location": Value("string"),
        }
    )
