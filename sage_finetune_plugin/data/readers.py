"""Readers: the sources a ``--data`` value names, and ``(location, record)`` pairs from each.

``resolve_sources`` turns what the user gave (a path, several, a folder, a glob, a Hugging Face
dataset id) into ``Source`` objects in a deterministic order: files as given, the files of a
folder and of a glob sorted (a folder's ``train`` split when it has split names, as datasets
lays them out), a ``datasets.save_to_disk`` folder and a Hub dataset as one source each.

Every source is read one record at a time: ``.jsonl`` (line by line), ``.json`` (a list, or an
object holding one list), ``.csv`` and ``.parquet`` (streamed in batches), ``.txt`` (one text
sample per block of lines separated by blank lines), saved datasets and Hub datasets (through
``datasets``, offline from the local cache when ``HF_HUB_OFFLINE`` is set). A line that cannot
be parsed is yielded as an ``Invalid`` record, so that ``--skip-invalid`` can count it; a source
that cannot be read at all raises DataError.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError, first_line
from .formats import Invalid, detect_format, json_type

#: A Hugging Face dataset id, optionally with a split: ``org/name`` or ``org/name:test``.
_DATASET_ID = re.compile(r"^(?P<id>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<split>[\w.\-\[\]%:]+))?$")
_GLOB_CHARS = ("*", "?", "[")


class Source:
    """One data source: a file, a saved dataset folder, or a Hugging Face dataset."""

    def __init__(
        self,
        name: str,
        path: Path | None = None,
        *,
        dataset_id: str | None = None,
        split: str | None = None,
    ) -> None:
        self.name = name
        self.path = path
        self.dataset_id = dataset_id
        self.split = split
        self._dataset: Any = None

    def __repr__(self) -> str:
        return f"Source({self.name!r})"

    def records(self) -> Iterator[tuple[str, Any]]:
        if self.path is None:
            dataset = self.hub_dataset()
            for number, record in enumerate(dataset, 1):
                yield f"row {number}", record
            return
        if self.path.is_dir():
            yield from _read_saved_dataset(self.path)
            return
        yield from READERS[self.path.suffix.lower()](self.path)

    def digest(self) -> str:
        """SHA-256 of what the source holds (a Hub dataset: its datasets fingerprint)."""
        if self.path is None:
            return hashlib.sha256(self.hub_dataset()._fingerprint.encode()).hexdigest()
        return _path_digest(self.path)

    def hub_dataset(self) -> Any:
        if self._dataset is None:
            self._dataset = _load_hub_dataset(self.name, self.dataset_id or "", self.split)
        return self._dataset


def resolve_sources(
    data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
) -> list[Source]:
    """The sources ``data`` names, in a deterministic order (see the module docstring)."""
    items = [data] if isinstance(data, str | os.PathLike) else list(data)
    if not items:
        raise DataError("No training data given: name at least one file, folder or dataset.")
    return [source for item in items for source in _expand(os.fspath(item))]


def _expand(text: str) -> list[Source]:
    path = Path(text).expanduser()
    if path.is_file():
        _check_suffix(path, text)
        return [Source(text, path)]
    if path.is_dir():
        return _folder(text, path, None)
    base, colon, split = text.rpartition(":")
    if colon and split and Path(base).expanduser().is_dir():  # folder:split
        return _folder(base, Path(base).expanduser(), split)
    if any(char in text for char in _GLOB_CHARS):
        matches = sorted(p for p in glob.glob(os.path.expanduser(text), recursive=True))
        files = [Path(p) for p in matches if Path(p).is_file()]
        if not files:
            raise DataError(f"{text}: no files match this pattern.")
        for file in files:
            _check_suffix(file, str(file))
        return [Source(str(file), file) for file in files]
    match = _DATASET_ID.match(text)
    if match and path.suffix.lower() not in READERS and not text.startswith((".", "~", "/")):
        return [Source(text, dataset_id=match["id"], split=match["split"])]
    raise DataError(f"{text}: no such file.")


def _check_suffix(path: Path, name: str) -> None:
    if path.suffix.lower() not in READERS:
        raise DataError(
            f"{name}: unsupported file type {path.suffix.lower() or '(none)'!r}; use "
            f"{', '.join(READERS)}, a folder of such files, a directory written by "
            "datasets.save_to_disk or a Hugging Face dataset id."
        )


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()
    )


def _folder(name: str, folder: Path, split: str | None) -> list[Source]:
    """A saved dataset, or the data files of a folder (its ``split``, default train)."""
    if _is_saved_dataset(folder):
        if split is not None:
            raise DataError(f"{name}: a saved dataset folder; pass it without ':{split}'.")
        return [Source(name, folder)]
    script = folder / f"{folder.name}.py"
    if script.is_file():
        raise DataError(
            f"{name}: a dataset with a loading script ({script.name}), which the datasets "
            "library no longer runs (since 4.0): export its data to .jsonl or .parquet files "
            "and pass those as data."
        )
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    try:
        patterns = get_data_patterns(str(folder))
        splits = DataFilesDict.from_patterns(patterns, base_path=str(folder))
    except (EmptyDatasetError, FileNotFoundError):
        splits = {}
    files = {
        str(key): sorted(Path(f) for f in found if Path(f).suffix.lower() in READERS)
        for key, found in splits.items()
    }
    files = {key: found for key, found in files.items() if found}
    if not files:
        raise DataError(
            f"{name}: a folder without data files ({', '.join(READERS)}) and not a directory "
            "written by datasets.save_to_disk."
        )
    wanted = split or "train"
    if wanted not in files:
        raise DataError(
            f"{name}: no {wanted!r} split among the folder's data files (splits: "
            f"{', '.join(files)}); name one as {name}:SPLIT."
        )
    return [Source(os.path.join(name, os.path.relpath(f, folder)), f) for f in files[wanted]]


def _load_hub_dataset(name: str, dataset_id: str, split: str | None) -> Any:
    """A Hugging Face dataset through ``datasets.load_dataset`` (the local cache when offline)."""
    import datasets

    try:
        return datasets.load_dataset(dataset_id, split=split or "train")
    except ValueError as exc:
        if "split" in str(exc).lower() and "unknown" in str(exc).lower():
            raise DataError(
                f"{name}: {first_line(exc)}; name a split as {dataset_id}:SPLIT."
            ) from None
        raise DataError(f"{name}: cannot load this dataset ({first_line(exc)}).") from None
    except Exception as exc:  # network, offline mode, missing repository: one line
        fetch = f"python -c \"import datasets; datasets.load_dataset('{dataset_id}')\""
        raise DataError(
            f"{name}: no such file or folder, and the Hugging Face dataset {dataset_id!r} is "
            f"not in the local datasets cache ({first_line(exc)}). Download it once with network "
            f"access ({fetch}), or save its files locally and pass them as data."
        ) from None


# --- file readers -------------------------------------------------------------------------------


def _read_jsonl(source: Path) -> Iterator[tuple[str, Any]]:
    for location, line in _lines(source):
        if isinstance(line, Invalid):
            yield location, line
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


def _lines(source: Path) -> Iterator[tuple[str, str | Invalid]]:
    """``("line N", text)`` for each line; a line that is not UTF-8 as an Invalid."""
    with open_binary(source) as handle:
        for number, raw in enumerate(handle, 1):
            location = f"line {number}"
            try:
                yield location, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield location, Invalid("not UTF-8", f"not valid UTF-8 ({exc.reason})")


def _read_text(source: Path) -> Iterator[tuple[str, Any]]:
    """One ``{"text": ...}`` record per block of non-blank lines (location: its first line)."""
    block: list[str] = []
    start = ""
    for location, line in _lines(source):
        if isinstance(line, Invalid):
            yield location, line
        elif line.strip():
            start = start if block else location
            block.append(line)
        elif block:
            yield start, {"text": "".join(block).rstrip()}
            block = []
    if block:
        yield start, {"text": "".join(block).rstrip()}


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


READERS: dict[str, Callable[[Path], Iterator[tuple[str, Any]]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
    ".txt": _read_text,
}


def read_records(source: str | os.PathLike[str]) -> Iterator[tuple[str, Any]]:
    """``(location, record)`` pairs of everything ``source`` names (a file, a folder, a glob,
    a dataset id), in order; other data layers (preference data) read through this too."""
    for found in _expand(os.fspath(source)):
        yield from found.records()


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


def _path_digest(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else "").encode())
        with open_binary(file) as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def is_records(data: Any) -> bool:
    """Whether ``data`` is a list of records (rather than a path or a list of paths)."""
    if isinstance(data, str | os.PathLike):
        return False
    return not data or not isinstance(next(iter(data)), str | os.PathLike)


def content_hash(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Sequence[Mapping[str, Any]],
) -> str:
    """SHA-256 of a data file, of every file of a saved dataset directory, of several sources
    (in order), or of records."""
    digest = hashlib.sha256()
    if is_records(source):
        records = list(source)  # type: ignore[arg-type]
        digest.update(json.dumps(records, sort_keys=True, ensure_ascii=False).encode())
        return digest.hexdigest()
    sources = resolve_sources(source)  # type: ignore[arg-type]
    if len(sources) == 1:
        return sources[0].digest()
    for found in sources:
        digest.update(found.digest().encode())
    return digest.hexdigest()
