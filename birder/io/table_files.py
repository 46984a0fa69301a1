"""Tables on disk: their columns, and reading and writing them as CSV or Parquet.

A table is a :class:`TableSpec`: named, typed columns, the first of which is always ``path`` (the input file a row
is about), which orders and deduplicates rows. Rows travel as lists of strings (CSV cells): the same text whatever
the storage format, so a table can be journaled as CSV and written as Parquet without a change in its numbers.

Reading forgives a torn last line (a process killed in the middle of a write); writing is atomic
(:func:`~birder.io.atomic.atomic_write_path`): a table file is always complete, never half of one.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from birder.errors import BirderError
from birder.io.atomic import atomic_write_path

PATH_COLUMN = "path"
# Row groups of this many rows keep Parquet reading and writing streamed, in bounded memory.
_PARQUET_ROWS_PER_GROUP = 8192

Row = list[str]


# ---------------------------------------------------------------------------------------------------------------------
# Columns and tables
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """A column: its name, its type in Parquet (``string``, ``int64``, ``float32``, ``float64``) and its text
    format."""

    name: str
    kind: str = "string"
    # Python format spec for floats in CSV: 6 decimals are plenty for a person reading probabilities; tables
    # meant for machines (embeddings, logits) use 9 significant digits, which round-trip float32 exactly.
    fmt: str = ""

    def format(self, value: Any) -> str:
        if value is None:
            return ""
        if self.kind == "string":
            return str(value)
        if self.kind == "int64":
            return str(int(value))
        if value != value:  # NaN
            return "nan"
        return format(float(value), self.fmt or ".9g")

    def parse(self, text: str) -> Any:
        """The typed value of a CSV cell (``None`` for an empty one)."""
        if text == "":
            return None
        if self.kind == "int64":
            return int(text)
        return text if self.kind == "string" else float(text)


@dataclass(frozen=True)
class TableSpec:
    """One table; its first column is always the input's path, which orders and deduplicates rows.

    ``fixed_format``: always stored in this format, whatever the run's (e.g. a table read by people: ``csv``).
    ``marks_done``: a path in this table is done; a resumed run does not redo it (see :mod:`birder.io.journal`).
    """

    name: str
    columns: tuple[Column, ...]
    fixed_format: str | None = None
    marks_done: bool = False

    def __post_init__(self) -> None:
        if not self.columns or self.columns[0].name != PATH_COLUMN:
            raise ValueError(f"table '{self.name}': the first column must be '{PATH_COLUMN}'")

    @property
    def header(self) -> list[str]:
        return [column.name for column in self.columns]

    def format_row(self, values: Sequence[Any]) -> Row:
        return [column.format(value) for (column, value) in zip(self.columns, values, strict=True)]


def string_columns(*names: str) -> tuple[Column, ...]:
    return tuple(Column(name) for name in names)


def float_columns(names: Iterable[str], kind: str = "float32", fmt: str = ".9g") -> tuple[Column, ...]:
    return tuple(Column(name, kind, fmt) for name in names)


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def open_text(path: Path, mode: str) -> IO[str]:
    """A CSV file opened for ``csv``; a path that is not valid UTF-8 (possible on Linux) round-trips intact."""
    return open(path, mode, newline="", encoding="utf-8", errors="surrogateescape")


def read_csv_table(path: Path) -> tuple[list[str], Iterator[Row]]:
    """The header and rows of a CSV table or journal; a torn last line (killed mid-write) is dropped.

    The rows are read lazily: the file is opened when iteration starts and closed when it ends (or when the
    iterator is dropped), so a caller that only needs the header leaves no file open.
    """
    with open_text(path, "r") as handle:
        header = next(csv.reader(handle), None)
    if header is None:
        return ([], iter(()))

    return (header, _csv_rows(path, len(header)))


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() == 0:
            return False
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def _csv_rows(path: Path, width: int) -> Iterator[Row]:
    complete = _ends_with_newline(path)
    with open_text(path, "r") as handle:
        reader = csv.reader(handle)
        next(reader, None)  # the header
        previous: Row | None = None
        try:
            for row in reader:
                if previous is not None and len(previous) == width:
                    yield previous
                previous = row
        except csv.Error:
            previous = None  # damage can only be at the torn end: everything before it was yielded
        if previous is not None and complete and len(previous) == width:
            yield previous


def read_table_header_and_paths(path: Path) -> tuple[list[str], Iterator[str]]:
    """The column names of a table file (CSV or Parquet, by suffix) and its path column."""
    if path.suffix == ".parquet":
        header = _import_parquet().read_schema(path).names
        return (header, (values[0] for values in _parquet_rows(path, columns=[PATH_COLUMN])))

    (header, rows) = read_csv_table(path)
    return (header, (row[0] for row in rows))


def read_table_rows(path: Path, spec: TableSpec) -> Iterator[Row]:
    """The rows of a table file (CSV or Parquet, by suffix) as text, formatted as ``spec`` formats them."""
    if path.suffix == ".parquet":
        for values in _parquet_rows(path):
            yield spec.format_row(values)
    else:
        (_, rows) = read_csv_table(path)
        yield from rows


def _parquet_rows(path: Path, columns: list[str] | None = None) -> Iterator[tuple[Any, ...]]:
    """The typed values of a Parquet table, row by row, one row group in memory at a time (opened lazily)."""
    with _import_parquet().ParquetFile(path) as parquet:
        for batch in parquet.iter_batches(columns=columns, batch_size=_PARQUET_ROWS_PER_GROUP):
            yield from zip(*(batch.column(i).to_pylist() for i in range(batch.num_columns)), strict=True)


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------


def write_table(path: Path, spec: TableSpec, rows: Iterable[Row]) -> int:
    """Write ``rows`` to ``path`` (CSV or Parquet, by suffix) atomically; returns the number of rows."""
    count = 0
    with atomic_write_path(path) as tmp:
        if path.suffix == ".parquet":
            count = _write_parquet(tmp, spec, rows)
        else:
            with open_text(tmp, "w") as handle:
                writer = csv.writer(handle, lineterminator="\n")
                writer.writerow(spec.header)
                for row in rows:
                    writer.writerow(row)
                    count += 1

    return count


def _write_parquet(path: Path, spec: TableSpec, rows: Iterable[Row]) -> int:
    pa = _import_pyarrow()
    pq = _import_parquet()
    types = {"string": pa.string(), "int64": pa.int64(), "float32": pa.float32(), "float64": pa.float64()}
    schema = pa.schema([pa.field(column.name, types[column.kind]) for column in spec.columns])
    count = 0
    with pq.ParquetWriter(path, schema) as writer:
        batch: list[Row] = []
        for row in rows:
            batch.append(row)
            if len(batch) == _PARQUET_ROWS_PER_GROUP:
                writer.write_table(_arrow_table(pa, schema, spec, batch))
                count += len(batch)
                batch.clear()
        if batch or count == 0:
            writer.write_table(_arrow_table(pa, schema, spec, batch))
            count += len(batch)

    return count


def _arrow_table(pa: Any, schema: Any, spec: TableSpec, rows: list[Row]) -> Any:
    columns = [[column.parse(row[i]) for row in rows] for (i, column) in enumerate(spec.columns)]
    return pa.Table.from_arrays(
        [pa.array(values, type=field.type) for (values, field) in zip(columns, schema, strict=True)], schema=schema
    )


# ---------------------------------------------------------------------------------------------------------------------
# Optional extra
# ---------------------------------------------------------------------------------------------------------------------


def _import_pyarrow() -> Any:
    try:
        import pyarrow
    except ImportError:
        raise BirderError("Parquet output needs pyarrow: pip install 'birder[parquet]'") from None
    return pyarrow


def _import_parquet() -> Any:
    _import_pyarrow()
    import pyarrow.parquet

    return pyarrow.parquet
