"""Data file readers (JSON lines, JSON, CSV, parquet; optionally gzipped) that keep every row's place.

A location is `file:LINE` for line-based files, `file item N` for a JSON list and `file row N` for parquet, so a
rejected row can be found in the file. A file that cannot be read at all is a DataError naming it.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from align.data.converters import RowError
from align.errors import DataError

# Each reader yields (location, row) or (location, RowError) so unreadable rows keep their place.
RawRows = Iterator[tuple[str, Any]]


def _open_binary(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # type: ignore[return-value]


def _read_jsonl(path: Path) -> RawRows:
    with _open_binary(path) as handle:
        for number, raw in enumerate(handle, 1):
            location = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield location, RowError(f"not valid UTF-8: {exc.reason}")
                continue
            if not line.strip():
                continue
            try:
                yield location, json.loads(line)
            except json.JSONDecodeError as exc:
                yield location, RowError(f"invalid JSON: {exc.msg} (column {exc.colno})")


def _read_json(path: Path) -> RawRows:
    with _open_binary(path) as handle:
        try:
            data = json.loads(handle.read().decode("utf-8-sig"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not valid UTF-8: {exc.reason}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of rows, got {type(data).__name__}")
    for index, item in enumerate(data):
        yield f"{path} item {index}", item


def _read_csv(path: Path) -> RawRows:
    with _open_binary(path) as binary, io.TextIOWrapper(binary, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            reader.fieldnames  # noqa: B018 -- reads the header so line numbers below start after it
            start = reader.line_num + 1
            for row in reader:
                location = f"{path}:{start}"
                start = reader.line_num + 1
                if None in row:
                    yield location, RowError(f"{len(row[None])} more value(s) than the header has columns")
                else:
                    yield location, row
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(f"{path}:{reader.line_num}: cannot parse CSV: {exc}") from None


def _read_parquet(path: Path) -> RawRows:
    import pyarrow.parquet as pq  # imported here: only parquet cards pay for it

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        raise DataError(f"{path}: cannot read parquet: {exc}") from None
    for index, row in enumerate(rows):
        yield f"{path} row {index}", row


_READERS: dict[str, Callable[[Path], RawRows]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def _reader_for(path: Path, where: str) -> Callable[[Path], RawRows]:
    suffixes = path.suffixes[-2:] if path.suffix == ".gz" else path.suffixes[-1:]
    reader = _READERS.get(suffixes[0] if suffixes else "")
    if reader is None:
        raise DataError(f"{where}: {path}: unsupported file type; use one of {', '.join(_READERS)} (optionally .gz)")
    return reader


def read_files(where: str, files: Iterable[Path]) -> RawRows:
    """The rows of every file in turn; `where` (the card line naming them) prefixes an unsupported-type error."""
    for path in files:
        yield from _reader_for(path, where)(path)
