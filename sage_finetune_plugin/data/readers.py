"""Readers: ``(location, record)`` pairs from every supported source, one record at a time.

``.jsonl`` (line by line), ``.json`` (a list, or an object holding one list), ``.csv`` and
``.parquet`` (streamed in batches), and directories written by ``datasets.save_to_disk``. A line
that cannot be parsed is yielded as an ``Invalid`` record, so that ``--skip-invalid`` can count
it; a file that cannot be read at all raises DataError.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError
from .formats import Invalid, detect_format, json_type


def read_records(source: Path) -> Iterator[tuple[str, Any]]:
    if source.is_dir():
        yield from _read_saved_dataset(source)
        return
    suffix = source.suffix.lower()
    readers = {
        ".jsonl": _read_jsonl,
        ".json": _read_json,
        ".csv": _read_csv,
        ".parquet": _read_parquet,
    }
    if suffix not in readers:
        raise DataError(
            f"{source}: unsupported file type {suffix or '(none)'!r}; use "
            f"{', '.join(readers)} or a directory written by datasets.save_to_disk."
        )
    yield from readers[suffix](source)


def _read_jsonl(source: Path) -> Iterator[tuple[str, Any]]:
    with open_binary(source) as handle:
        for number, raw in enumerate(handle, 1):
            location = f"line {number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield location, Invalid("not UTF-8", f"not valid UTF-8 ({exc.reason})")
                continue
            if not line.strip():
                continue
            try:
                yield location, json.loads(line)
            except json.JSONDecodeError as exc:
                yield (
                    location,
                    Invalid("invalid JSON", f"invalid JSON at column {exc.colno}: {exc.msg}"),
                )


def _read_json(source: Path) -> Iterator[tuple[str, Any]]:
    with open_binary(source) as handle:
        raw = handle.read()
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{source}: not valid UTF-8 ({exc.reason}).") from None
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object per line, named .json
            yield from _read_jsonl(source)
            return
        raise DataError(
            f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}."
        ) from None
    if isinstance(data, dict):
        data = _records_in_object(source, data)
    if not isinstance(data, list):
        raise DataError(
            f"{source}: expected a list of records (or an object holding one), "
            f"found {json_type(data)}."
        )
    for number, record in enumerate(data, 1):
        yield f"record {number}", record


def _records_in_object(source: Path, data: dict[str, Any]) -> list[Any]:
    if detect_format(data) is not None:  # a single record
        return [data]
    lists = [key for key, value in data.items() if isinstance(value, list)]
    if len(lists) != 1:
        raise DataError(
            f"{source}: a JSON object must hold exactly one list of records "
            f"(found {len(lists)} lists: {', '.join(lists) or 'none'})."
        )
    return data[lists[0]]


def _read_csv(source: Path) -> Iterator[tuple[str, Any]]:
    # Code answers easily exceed the csv module's default 128 KiB cell limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open_binary(source) as binary:
        text = (line.decode("utf-8-sig") for line in binary)
        try:
            for number, row in enumerate(csv.DictReader(text), 1):
                yield f"row {number}", {k: v for k, v in row.items() if isinstance(k, str)}
        except UnicodeDecodeError as exc:
            raise DataError(f"{source}: not valid UTF-8 ({exc.reason}).") from None
        except csv.Error as exc:
            raise DataError(f"{source}: malformed CSV ({exc}).") from None


def _read_parquet(source: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{source}: cannot read Parquet ({exc}).") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=1000):
        for record in batch.to_pylist():
            number += 1
            yield f"row {number}", record


def _read_saved_dataset(source: Path) -> Iterator[tuple[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    try:
        saved = load_from_disk(str(source))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(
            f"{source}: a directory, but not one written by datasets.save_to_disk ({exc})."
        ) from None
    if isinstance(saved, DatasetDict):
        if "train" in saved:
            saved = saved["train"]
        elif len(saved) == 1:
            saved = next(iter(saved.values()))
        else:
            raise DataError(
                f"{source}: a DatasetDict with splits {', '.join(saved)} and no 'train' split."
            )
    for number, record in enumerate(saved, 1):
        yield f"row {number}", record


@contextlib.contextmanager
def open_binary(source: Path) -> Iterator[Any]:
    try:
        handle = source.open("rb")
    except FileNotFoundError:
        raise DataError(f"{source}: no such file.") from None
    except OSError as exc:
        raise DataError(f"{source}: cannot read ({exc.strerror or exc}).") from None
    with handle:
        yield handle


def content_hash(source: str | os.PathLike[str] | Sequence[Mapping[str, Any]]) -> str:
    """SHA-256 of a data file, of every file of a saved dataset directory, or of records."""
    digest = hashlib.sha256()
    if isinstance(source, str | os.PathLike):
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"{path}: no such file or directory.")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(path) if path.is_dir() else "").encode())
            with open_binary(file) as handle:
                for chunk in iter(lambda h=handle: h.read(1 << 20), b""):
                    digest.update(chunk)
    else:
        digest.update(json.dumps(list(source), sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()
