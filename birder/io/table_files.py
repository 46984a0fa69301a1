"""Tables on disk: their columns, and reading and writing them as CSV or Parquet.

A table is a :class:`TableSpec`: named, typed columns, the first of which is always ``path`` (the input file a row
is about), which orders and deduplicates rows. Rows travel as lists of strings (CSV cells): the same text whatever
the storage format, so a table can be journaled as CSV and written as Parquet without a change in its numbers.

Reading forgives a torn last line (a process killed in the middle of a write); writing is atomic
(:func:`~birder.io.atomic.atomic_write_path`): a table file is always complete, never half of one.
"""

from __future__ import annotations

import csv
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from birder.errors import BirderError, one_line
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
    ``vector_column``: in Parquet, the columns after the path (float32) are one ``FixedSizeList<float32>`` column
    of this name (the embeddings: :func:`embedding_table`); in CSV and as rows they stay one column per value.
    """

    name: str
    columns: tuple[Column, ...]
    fixed_format: str | None = None
    marks_done: bool = False
    vector_column: str | None = None

    def __post_init__(self) -> None:
        if not self.columns or self.columns[0].name != PATH_COLUMN:
            raise ValueError(f"table '{self.name}': the first column must be '{PATH_COLUMN}'")
        values = self.columns[1:]
        if self.vector_column is not None and (not values or any(column.kind != "float32" for column in values)):
            raise ValueError(f"table '{self.name}': a vector column needs float32 columns after the path")

    @property
    def header(self) -> list[str]:
        return [column.name for column in self.columns]

    def format_row(self, values: Sequence[Any]) -> Row:
        return [column.format(value) for (column, value) in zip(self.columns, values, strict=True)]


def string_columns(*names: str) -> tuple[Column, ...]:
    return tuple(Column(name) for name in names)


def float_columns(names: Iterable[str], kind: str = "float32", fmt: str = ".9g") -> tuple[Column, ...]:
    return tuple(Column(name, kind, fmt) for name in names)


# The embeddings table: ``path, e0 .. e<D-1>`` in CSV; ``path, embedding`` (FixedSizeList<float32> of D) in
# Parquet, the form vector stores and dataset libraries read. Files of either layout (and Parquet files written
# before the list column, one float column per value) are read alike.
EMBEDDING_COLUMN = "embedding"
EMBEDDING_PREFIX = "e"


def embedding_table(dim: int, name: str = "embeddings") -> TableSpec:
    """The spec of an embeddings table of ``dim`` values per photo."""
    columns = float_columns(f"{EMBEDDING_PREFIX}{i}" for i in range(dim))
    return TableSpec(name, (Column(PATH_COLUMN), *columns), vector_column=EMBEDDING_COLUMN)


def _value_names(vector_column: str, size: int) -> list[str]:
    """The per-value column names a Parquet list column stands for (``embedding`` -> ``e0`` .. ``e<size-1>``)."""
    prefix = EMBEDDING_PREFIX if vector_column == EMBEDDING_COLUMN else f"{vector_column}_"
    return [f"{prefix}{i}" for i in range(size)]


def _is_vector(arrow_type: Any) -> bool:
    pa = import_pyarrow()
    return bool(pa.types.is_fixed_size_list(arrow_type) and pa.types.is_floating(arrow_type.value_type))


def flat_header(schema: Any) -> list[str]:
    """The column names of a Parquet schema as its CSV twin has them: a list column spread into one per value."""
    names: list[str] = []
    for field in schema:
        names += _value_names(field.name, field.type.list_size) if _is_vector(field.type) else [field.name]
    return names


def _flat_embedding_size(schema: Any) -> int | None:
    """D when ``schema`` is an embeddings table of the old Parquet layout (``path, e0 .. e<D-1>``, floats)."""
    pa = import_pyarrow()
    names = schema.names
    size = len(names) - 1
    if size < 1 or names[0] != PATH_COLUMN or names[1:] != _value_names(EMBEDDING_COLUMN, size):
        return None
    return size if all(pa.types.is_floating(schema.field(i).type) for i in range(1, size + 1)) else None


def stored_schema(schema: Any) -> Any:
    """The schema a table is written with now: an embeddings table of the old layout (one float column per value)
    becomes ``path, embedding`` (FixedSizeList<float32>); any other schema is unchanged."""
    pa = import_pyarrow()
    size = _flat_embedding_size(schema)
    if size is None:
        return schema
    return pa.schema([schema.field(0), pa.field(EMBEDDING_COLUMN, pa.list_(pa.float32(), size))])


def stored_batch(batch: Any) -> Any:
    """A record batch in :func:`stored_schema`'s layout (the old embeddings layout converted, others as they are)."""
    pa = import_pyarrow()
    size = _flat_embedding_size(batch.schema)
    if size is None:
        return batch
    matrix = np.column_stack(
        [batch.column(i).to_numpy(zero_copy_only=False).astype(np.float32) for i in range(1, size + 1)]
    )
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()), size)
    return pa.RecordBatch.from_arrays([batch.column(0), vectors], schema=stored_schema(batch.schema))


@dataclass(frozen=True)
class Embeddings:
    """An embeddings table in memory: the photos' paths and their vectors, ``[N, D]`` float32, row for row."""

    paths: list[str]
    vectors: np.ndarray


def read_embeddings(path: str | os.PathLike) -> Embeddings:
    """An embeddings table (``birder-predict --save-embeddings``) of any layout: CSV ``path, e0 ..``, Parquet
    ``path, embedding`` (FixedSizeList), or Parquet ``path, e0 ..`` (written before the list column)."""
    path = Path(path)
    if not path.is_file():
        raise BirderError(f"{path}: no such embeddings file")
    if path.suffix == ".parquet":
        return _read_parquet_embeddings(path)

    try:
        (header, rows) = read_csv_table(path)
        size = len(header) - 1
        if size < 1 or header[0] != PATH_COLUMN or header[1:] != _value_names(EMBEDDING_COLUMN, size):
            raise BirderError(f"{path}: not an embeddings table (expected the columns path, e0, e1, ...)")
        (paths, values) = ([], [])
        for row in rows:
            paths.append(row[0])
            values.append(row[1:])
        vectors = np.array(values, dtype=np.float64).reshape(len(paths), size).astype(np.float32)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise BirderError(f"{path}: unreadable embeddings table ({one_line(err, 200)})") from None
    return Embeddings(paths, vectors)


def _read_parquet_embeddings(path: Path) -> Embeddings:
    pa = import_pyarrow()
    pq = import_parquet()
    try:
        schema = stored_schema(pq.read_schema(path))
        if schema.names != [PATH_COLUMN, EMBEDDING_COLUMN] or not _is_vector(schema.field(1).type):
            raise BirderError(
                f"{path}: not an embeddings table (columns {', '.join(schema.names[:4])}; expected path and "
                f"{EMBEDDING_COLUMN}, or path, e0, e1, ...)"
            )
        size = schema.field(1).type.list_size
        (paths, vectors) = ([], [np.zeros((0, size), np.float32)])
        with pq.ParquetFile(path) as parquet:
            for batch in parquet.iter_batches(batch_size=_PARQUET_ROWS_PER_GROUP):
                batch = stored_batch(batch)
                paths += batch.column(0).to_pylist()
                flat = batch.column(1).flatten().to_numpy(zero_copy_only=False)
                vectors.append(flat.astype(np.float32).reshape(batch.num_rows, size))
    except (OSError, pa.ArrowException) as err:
        raise BirderError(f"{path}: unreadable Parquet file ({one_line(err, 200)})") from None
    return Embeddings(paths, np.concatenate(vectors))


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
    """The column names of a table file (CSV or Parquet, by suffix; a Parquet list column spread into one name per
    value, as in CSV) and its path column."""
    if path.suffix == ".parquet":
        header = flat_header(import_parquet().read_schema(path))
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
    """The typed values of a Parquet table, row by row, one row group in memory at a time (opened lazily); a list
    column's values spread in its row as CSV has them."""
    with import_parquet().ParquetFile(path) as parquet:
        for batch in parquet.iter_batches(columns=columns, batch_size=_PARQUET_ROWS_PER_GROUP):
            parts = []
            for column in batch.columns:
                if _is_vector(column.type):
                    matrix = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)
                    parts.append([tuple(values) for values in matrix.tolist()])
                else:
                    parts.append([(value,) for value in column.to_pylist()])
            for row_parts in zip(*parts, strict=True):
                yield tuple(itertools.chain.from_iterable(row_parts))


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
    pa = import_pyarrow()
    pq = import_parquet()
    types = {"string": pa.string(), "int64": pa.int64(), "float32": pa.float32(), "float64": pa.float64()}
    if spec.vector_column is not None:
        vector = pa.list_(pa.float32(), len(spec.columns) - 1)
        schema = pa.schema([pa.field(PATH_COLUMN, pa.string()), pa.field(spec.vector_column, vector)])
    else:
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
    if spec.vector_column is not None:
        size = len(spec.columns) - 1
        # The text is float32's 9 significant digits: parsed as float64, then rounded, it is the float32 written
        values = np.array([row[1:] for row in rows], dtype=np.float64).reshape(len(rows), size).astype(np.float32)
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float32()), size)
        return pa.Table.from_arrays([pa.array([row[0] for row in rows], pa.string()), vectors], schema=schema)
    columns = [[column.parse(row[i]) for row in rows] for (i, column) in enumerate(spec.columns)]
    return pa.Table.from_arrays(
        [pa.array(values, type=field.type) for (values, field) in zip(columns, schema, strict=True)], schema=schema
    )


# ---------------------------------------------------------------------------------------------------------------------
# Optional extra
# ---------------------------------------------------------------------------------------------------------------------


def import_pyarrow(needed_for: str = "Parquet output", extra: str = "parquet") -> Any:
    """pyarrow with the parts birder uses (compute, csv, parquet); without it, one line naming the extra to install."""
    try:
        import pyarrow
        import pyarrow.compute
        import pyarrow.csv
        import pyarrow.parquet
    except ImportError:
        raise BirderError(f"{needed_for} needs pyarrow: pip install 'birder[{extra}]'") from None
    return pyarrow


def import_parquet() -> Any:
    import_pyarrow()
    import pyarrow.parquet

    return pyarrow.parquet
