"""Prediction outputs that survive a crash: incremental, atomic and resumable tables (CSV or Parquet).

How a run writes, and why this way:

- While a run goes on, every table (results, failures, probabilities, logits, embeddings, ...) is an
  append-only *journal*: ``<output-dir>/.partial/<table>.r<rank>.a<attempt>.csv``, one file per table, per
  rank (``torchrun``) and per attempt (each ``--resume`` starts new files rather than appending to old ones).
  Rows are buffered and appended a chunk at a time, then flushed and ``fsync``-ed, results last: a photo
  counts as done only once its results (or failures) row is on disk, and everything it needs was written
  before it. A run killed in the middle of a write leaves at most one unterminated line, which readers drop.
- When the run completes, the journals are merged into the final files, ``<output-dir>/<table>.<csv|parquet>``,
  in the original photo order and without duplicates, each written to a temporary file that is renamed into
  place (:func:`~birder.io.atomic.atomic_write_path`). A final file is therefore always complete: the previous
  run's or this one's, never half of one. The journals are removed after every table is merged.
- ``--resume`` reads which photos are done from the journals *and* the final files (so a finished run can be
  extended with new photos), skips them, and merges old and new rows at the end. A ``run.json`` beside the
  tables (and one in ``.partial/``) records the settings that shape the rows; resuming with different ones is
  refused rather than mixing two kinds of rows in one table, and final tables left by a run with other settings
  are ignored.

Journals are always CSV, whatever ``--format``: Parquet files cannot be appended to. Each journal is sorted by
photo order by construction (a rank handles its photos in order, and the photo order does not depend on the order
of the inputs: :func:`~birder.inference.dataset.discover_images`), so the merge streams (``heapq.merge``) and
never holds a whole table in memory.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from birder.errors import BirderError
from birder.io.atomic import atomic_write_path, fsync_directory

OUTPUT_FORMATS = ("csv", "parquet")
JOURNAL_DIR = ".partial"
RUN_INFO_FILE = "run.json"
PATH_COLUMN = "path"
# Photo tables: a path in one of them is done (a failed photo is not retried on --resume: its reason is known).
DONE_TABLES = ("results", "failures")
# Row groups of this many rows keep Parquet writing streamed, in bounded memory.
_PARQUET_ROWS_PER_GROUP = 8192
_JOURNAL_NAME = re.compile(r"^(?P<table>[A-Za-z0-9_-]+)\.r(?P<rank>\d+)\.a(?P<attempt>\d+)\.csv$")

Row = list[str]


# ---------------------------------------------------------------------------------------------------------------------
# Table schemas
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """A column: its name, its type in Parquet (``string``, ``float32``, ``float64``) and its text format."""

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
        if value != value:  # NaN
            return "nan"
        return format(float(value), self.fmt or ".9g")

    def parse(self, text: str) -> Any:
        """The typed value of a CSV cell (``None`` for an empty one)."""
        if text == "":
            return None
        return text if self.kind == "string" else float(text)


@dataclass(frozen=True)
class TableSpec:
    """One output table; its first column is always the photo's path, which orders and deduplicates rows."""

    name: str
    columns: tuple[Column, ...]

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


def final_path(output_dir: Path, spec: TableSpec, file_format: str) -> Path:
    # Failures are few and read by people: always CSV
    suffix = "csv" if spec.name == "failures" else file_format
    return output_dir / f"{spec.name}.{suffix}"


# ---------------------------------------------------------------------------------------------------------------------
# Journals: append-only, chunked, fsync-ed
# ---------------------------------------------------------------------------------------------------------------------


def _open_text(path: Path, mode: str):
    # surrogateescape: a file name that is not valid UTF-8 (possible on Linux) round-trips instead of failing
    return open(path, mode, newline="", encoding="utf-8", errors="surrogateescape")


class JournalWriter:
    """Append rows to one journal file; :meth:`commit` writes the buffered rows and makes them durable."""

    def __init__(self, path: Path, spec: TableSpec) -> None:
        self.path = path
        self.spec = spec
        self._pending: list[Row] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = _open_text(path, "x")  # "x": never append to or clobber another attempt's journal
        self._writer = csv.writer(self._file, lineterminator="\n")
        self._writer.writerow(spec.header)
        self._sync()
        fsync_directory(path.parent)

    def add(self, rows: Iterable[Row]) -> None:
        self._pending.extend(rows)

    def commit(self) -> None:
        if self._pending:
            self._writer.writerows(self._pending)
            self._pending.clear()
            self._sync()

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self.commit()
        self._file.close()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() == 0:
            return False
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def read_csv_table(path: Path) -> tuple[list[str], Iterator[Row]]:
    """The header and rows of a CSV table or journal; a torn last line (killed mid-write) is dropped.

    The rows are read lazily: the file is opened when iteration starts and closed when it ends (or when the
    iterator is dropped), so a caller that only needs the header leaves no file open.
    """
    with _open_text(path, "r") as handle:
        header = next(csv.reader(handle), None)
    if header is None:
        return ([], iter(()))

    return (header, _csv_rows(path, len(header)))


def _csv_rows(path: Path, width: int) -> Iterator[Row]:
    complete = _ends_with_newline(path)
    with _open_text(path, "r") as handle:
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


def list_journals(output_dir: Path) -> list[tuple[str, int, int, Path]]:
    """``(table, rank, attempt, path)`` of every journal in ``output_dir``."""
    journal_dir = output_dir / JOURNAL_DIR
    if not journal_dir.is_dir():
        return []

    found = []
    for path in sorted(journal_dir.iterdir()):
        match = _JOURNAL_NAME.match(path.name)
        if match:
            found.append((match["table"], int(match["rank"]), int(match["attempt"]), path))

    return found


class JournalSet:
    """This rank's journals for one attempt; rows are committed every ``chunk_size`` photos.

    ``specs`` lists the tables in commit order: the photo tables (results, failures) must come last, so a photo
    is marked done only after its other rows are durable.
    """

    def __init__(self, output_dir: Path, specs: Sequence[TableSpec], rank: int, attempt: int, chunk_size: int) -> None:
        if chunk_size < 1:
            raise BirderError(f"chunk size must be at least 1, got {chunk_size}")

        self.chunk_size = chunk_size
        journal_dir = output_dir / JOURNAL_DIR
        self.writers = {
            spec.name: JournalWriter(journal_dir / f"{spec.name}.r{rank}.a{attempt}.csv", spec) for spec in specs
        }
        self._photos_since_commit = 0

    def add(self, rows_by_table: Mapping[str, Iterable[Row]], num_photos: int) -> None:
        for name, rows in rows_by_table.items():
            self.writers[name].add(rows)

        self._photos_since_commit += num_photos
        if self._photos_since_commit >= self.chunk_size:
            self.commit()

    def commit(self) -> None:
        for writer in self.writers.values():
            writer.commit()
        self._photos_since_commit = 0

    def close(self) -> None:
        self.commit()
        for writer in self.writers.values():
            writer.close()


# ---------------------------------------------------------------------------------------------------------------------
# Starting and resuming a run
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResumeState:
    done: frozenset[str]  # paths already in a results or failures table
    attempt: int  # the number this attempt's journals carry
    include_final: bool = False  # the final tables belong to this run's settings: merge them in at the end


def _read_run_info(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: Path, content: Mapping[str, Any]) -> None:
    with atomic_write_path(path) as tmp:
        tmp.write_text(json.dumps(content, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def read_table_header_and_paths(path: Path) -> tuple[list[str], Iterator[str]]:
    """The column names of a final table (CSV or Parquet) and its path column."""
    if path.suffix == ".parquet":
        header = _import_parquet().read_schema(path).names
        return (header, (values[0] for values in _parquet_rows(path, columns=[PATH_COLUMN])))

    (header, rows) = read_csv_table(path)
    return (header, (row[0] for row in rows))


def _parquet_rows(path: Path, columns: list[str] | None = None) -> Iterator[tuple[Any, ...]]:
    """The typed values of a Parquet table, row by row, one row group in memory at a time (opened lazily)."""
    with _import_parquet().ParquetFile(path) as parquet:
        for batch in parquet.iter_batches(columns=columns, batch_size=_PARQUET_ROWS_PER_GROUP):
            yield from zip(*(batch.column(i).to_pylist() for i in range(batch.num_columns)), strict=True)


def prepare_run(
    output_dir: Path,
    specs: Sequence[TableSpec],
    file_format: str,
    settings: Mapping[str, Any],
    resume: bool,
) -> ResumeState:
    """Get ``output_dir`` ready for a run (on rank 0 only); with ``resume``, find the photos already done.

    Without ``resume`` the journals of an interrupted run are discarded. With it, the journals and final tables
    must have been written with the same ``settings`` and columns, else this raises :class:`BirderError`.
    """
    if file_format not in OUTPUT_FORMATS:
        raise BirderError(f"unknown output format '{file_format}'; choose one of: {', '.join(OUTPUT_FORMATS)}")

    journal_dir = output_dir / JOURNAL_DIR
    settings = json.loads(json.dumps(settings, default=str))  # as it will read back from run.json
    if not resume:
        shutil.rmtree(journal_dir, ignore_errors=True)
        journal_dir.mkdir(parents=True)
        _write_json_atomic(journal_dir / RUN_INFO_FILE, {"settings": settings})
        return ResumeState(frozenset(), 0)

    journals = list_journals(output_dir)
    journal_settings = _settings_in(journal_dir / RUN_INFO_FILE)
    final_settings = _settings_in(output_dir / RUN_INFO_FILE)
    # The journals describe the interrupted run; without them, the final tables describe the last finished one
    previous = journal_settings if journal_settings is not None else final_settings
    if previous is not None and previous != settings:
        changed = sorted(key for key in set(previous) | set(settings) if previous.get(key) != settings.get(key))
        raise BirderError(
            f"cannot --resume in '{output_dir}': the earlier run used other settings ({', '.join(changed)}); "
            "run again without --resume, or choose another --output-dir"
        )
    # Final tables of an older run with other settings (overwritten by the run being resumed) must not count
    include_final = final_settings == settings

    done: set[str] = set()
    by_name = {spec.name: spec for spec in specs}
    for table, _rank, _attempt, path in journals:
        if table in by_name:
            (header, rows) = read_csv_table(path)
            _check_header(path, header, by_name[table])
            if table in DONE_TABLES:
                done.update(row[0] for row in rows)

    for spec in specs if include_final else ():
        path = final_path(output_dir, spec, file_format)
        if path.is_file():
            (header, paths) = read_table_header_and_paths(path)
            _check_header(path, header, spec)
            if spec.name in DONE_TABLES:
                done.update(paths)

    journal_dir.mkdir(parents=True, exist_ok=True)
    if journal_settings is None:
        _write_json_atomic(journal_dir / RUN_INFO_FILE, {"settings": settings})

    attempt = max((attempt for (_, _, attempt, _) in journals), default=-1) + 1
    return ResumeState(frozenset(done), attempt, include_final)


def _settings_in(path: Path) -> dict[str, Any] | None:
    info = _read_run_info(path)
    return info.get("settings") if isinstance(info, dict) else None


def _check_header(path: Path, header: list[str], spec: TableSpec) -> None:
    if header != spec.header:
        raise BirderError(
            f"cannot --resume: {path} has other columns than this run would write "
            "(different --top-k, --species or model?); run again without --resume"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Merging into the final tables
# ---------------------------------------------------------------------------------------------------------------------


def _keyed(rows: Iterable[Row], order: Mapping[str, int], source: Path) -> Iterator[tuple[int, Row]]:
    last = -1
    for row in rows:
        index = order.get(row[0])
        if index is None:
            continue  # a photo that is no longer among the inputs
        if index < last:
            raise _UnsortedSource(source)
        last = index
        yield (index, row)


class _UnsortedSource(Exception):
    pass


def _final_table_rows(path: Path, spec: TableSpec) -> Iterator[Row]:
    if path.suffix == ".parquet":
        for values in _parquet_rows(path):
            yield spec.format_row(values)
    else:
        (_, rows) = read_csv_table(path)
        yield from rows


def _sorted_final_rows(path: Path, spec: TableSpec, order: Mapping[str, int]) -> Iterable[tuple[int, Row]]:
    """A previous final table's rows in photo order; sorted in memory only if the inputs were reordered."""
    try:
        for _ in _keyed((row[:1] for row in _final_table_rows(path, spec)), order, path):
            pass
    except _UnsortedSource:
        return sorted(_keyed_unchecked(_final_table_rows(path, spec), order), key=lambda item: item[0])

    return _keyed(_final_table_rows(path, spec), order, path)


def _keyed_unchecked(rows: Iterable[Row], order: Mapping[str, int]) -> Iterator[tuple[int, Row]]:
    for row in rows:
        if row[0] in order:
            yield (order[row[0]], row)


def merged_rows(
    output_dir: Path, spec: TableSpec, file_format: str, order: Mapping[str, int], include_final: bool
) -> Iterator[Row]:
    """Every row of table ``spec`` from the journals (and the previous final table), in photo order, deduplicated."""
    sources: list[Iterable[tuple[int, Row]]] = []
    for table, _rank, _attempt, path in list_journals(output_dir):
        if table == spec.name:
            (_, rows) = read_csv_table(path)
            sources.append(_keyed(rows, order, path))

    previous = final_path(output_dir, spec, file_format)
    if include_final and previous.is_file():
        sources.append(_sorted_final_rows(previous, spec, order))

    last_index = -1
    for index, row in heapq.merge(*sources, key=lambda item: item[0]):
        if index != last_index:  # the same photo twice: a chunk redone after a crash; keep the first
            last_index = index
            yield row


def write_table(path: Path, spec: TableSpec, rows: Iterable[Row]) -> int:
    """Write ``rows`` to ``path`` (CSV or Parquet, by suffix) atomically; returns the number of rows."""
    count = 0
    with atomic_write_path(path) as tmp:
        if path.suffix == ".parquet":
            count = _write_parquet(tmp, spec, rows)
        else:
            with _open_text(tmp, "w") as handle:
                writer = csv.writer(handle, lineterminator="\n")
                writer.writerow(spec.header)
                for row in rows:
                    writer.writerow(row)
                    count += 1

    return count


def _write_parquet(path: Path, spec: TableSpec, rows: Iterable[Row]) -> int:
    pa = _import_pyarrow()
    pq = _import_parquet()
    types = {"string": pa.string(), "float32": pa.float32(), "float64": pa.float64()}
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


def finalize_run(
    output_dir: Path,
    specs: Sequence[TableSpec],
    file_format: str,
    order: Mapping[str, int],
    include_final: bool,
    on_row: Mapping[str, Callable[[Row], None]] | None = None,
    run_info: Callable[[], Mapping[str, Any]] | None = None,
) -> dict[str, Path]:
    """Merge the journals into the final tables (rank 0, after every rank closed its journals), then remove them.

    ``on_row[table]`` sees each final row once, in order (the terminal summary is computed from it).
    ``run_info()``, called after the merge, is written to ``run.json`` beside the settings the run started with.
    """
    on_row = on_row or {}
    written = {}
    for spec in specs:
        path = final_path(output_dir, spec, file_format)
        rows = merged_rows(output_dir, spec, file_format, order, include_final)
        callback = on_row.get(spec.name)
        if callback is not None:
            rows = _tap(rows, callback)
        write_table(path, spec, rows)
        written[spec.name] = path

    journal_dir = output_dir / JOURNAL_DIR
    info = _read_run_info(journal_dir / RUN_INFO_FILE) or {}
    _write_json_atomic(output_dir / RUN_INFO_FILE, {**info, **(run_info() if run_info else {})})
    # Only now, with every final table in place, do the journals go: a crash before this line is resumable
    shutil.rmtree(journal_dir, ignore_errors=True)
    return written


def _tap(rows: Iterable[Row], callback: Callable[[Row], None]) -> Iterator[Row]:
    for row in rows:
        callback(row)
        yield row


# ---------------------------------------------------------------------------------------------------------------------
# The tables of a prediction run
# ---------------------------------------------------------------------------------------------------------------------

UNCERTAIN = "uncertain"
METADATA_COLUMNS = (
    Column("exif_datetime"),
    Column("gps_latitude", "float64", ".7f"),  # 7 decimals: about a centimetre
    Column("gps_longitude", "float64", ".7f"),
)


class PredictionTables:
    """The columns of ``birder-predict``'s tables, and its rows for each batch.

    - ``results``: path, prediction (the top class, or ``uncertain`` below ``min_prob``), top-k classes and
      probabilities, EXIF date and GPS position.
    - ``failures``: path, error (the one-line reason).
    - optional ``probabilities`` (one column per class), ``logits`` (per class of the model), ``embeddings``
      (``e0`` .. ``e<D-1>``) and ``features`` (path, feature file name).
    """

    def __init__(
        self,
        class_names: Sequence[str],
        top_k: int,
        *,
        all_class_names: Sequence[str] | None = None,
        probabilities: bool = False,
        logits: bool = False,
        embedding_dim: int | None = None,
        features: bool = False,
    ) -> None:
        self.top_k = max(1, min(top_k, len(class_names)))
        result_columns = [Column(PATH_COLUMN), Column("prediction")]
        for rank in range(1, self.top_k + 1):
            result_columns += [Column(f"top{rank}_class"), Column(f"top{rank}_prob", "float32", ".6f")]
        self.results = TableSpec("results", (*result_columns, *METADATA_COLUMNS))
        self.failures = TableSpec("failures", string_columns(PATH_COLUMN, "error"))

        extra = []
        if probabilities:
            extra.append(TableSpec("probabilities", (Column(PATH_COLUMN), *float_columns(class_names))))
        if logits:
            extra.append(TableSpec("logits", (Column(PATH_COLUMN), *float_columns(all_class_names or class_names))))
        if embedding_dim is not None:
            names = (f"e{i}" for i in range(embedding_dim))
            extra.append(TableSpec("embeddings", (Column(PATH_COLUMN), *float_columns(names))))
        if features:
            extra.append(TableSpec("features", string_columns(PATH_COLUMN, "file")))
        # Commit order: the photo tables last, so "done" implies every other row of the photo is on disk
        self.specs: tuple[TableSpec, ...] = (*extra, self.failures, self.results)
        self.class_names = list(class_names)

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    def rows(
        self,
        paths: Sequence[str],
        probabilities: Any,
        top_indices: Any,
        top_probabilities: Any,
        metadata: Sequence[Sequence[Any]],
        *,
        min_prob: float = 0.0,
        logits: Any = None,
        embeddings: Any = None,
        feature_files: Sequence[str] | None = None,
    ) -> dict[str, list[Row]]:
        """The rows of every table but failures for a batch of classified photos (arrays ``[B, ...]``)."""
        results = []
        for i, path in enumerate(paths):
            top = [
                (self.class_names[int(idx)], float(prob))
                for (idx, prob) in zip(top_indices[i], top_probabilities[i], strict=True)
            ]
            prediction = top[0][0] if top[0][1] >= min_prob else UNCERTAIN
            values = [path, prediction, *(value for pair in top for value in pair), *metadata[i]]
            results.append(self.results.format_row(values))

        rows: dict[str, list[Row]] = {"results": results}
        for spec in self.specs:
            if spec.name == "probabilities":
                rows[spec.name] = [spec.format_row([path, *probabilities[i]]) for (i, path) in enumerate(paths)]
            elif spec.name == "logits":
                rows[spec.name] = [spec.format_row([path, *logits[i]]) for (i, path) in enumerate(paths)]
            elif spec.name == "embeddings":
                rows[spec.name] = [spec.format_row([path, *embeddings[i]]) for (i, path) in enumerate(paths)]
            elif spec.name == "features":
                rows[spec.name] = [[path, name] for (path, name) in zip(paths, feature_files or (), strict=True)]

        return rows

    def failure_rows(self, failures: Iterable[tuple[str, str]]) -> dict[str, list[Row]]:
        return {"failures": [[path, reason] for (path, reason) in failures]}

    def parse_result(self, row: Row) -> tuple[str, str, list[tuple[str, float]]]:
        """``(path, prediction, [(class, probability), ...])`` of a results row."""
        top = [(row[2 + 2 * i], float(row[3 + 2 * i])) for i in range(self.top_k)]
        return (row[0], row[1], top)


# ---------------------------------------------------------------------------------------------------------------------
# Per-photo files (detection features)
# ---------------------------------------------------------------------------------------------------------------------


def feature_file_name(path: str) -> str:
    """A stable, unique file name for a photo's feature maps: readable stem plus a hash of the full path."""
    digest = hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).stem)[:40]
    return f"{stem}-{digest}.safetensors"


def write_feature_file(path: Path, features: Mapping[str, Any], photo: str) -> None:
    """Save one photo's feature maps (numpy or tensors, ``[D, h, w]``) to a ``.safetensors`` file, atomically."""
    import torch
    from safetensors.torch import save_file

    tensors = {name: torch.as_tensor(value).contiguous() for (name, value) in features.items()}
    with atomic_write_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"path": photo})


# ---------------------------------------------------------------------------------------------------------------------
# Optional extras
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
