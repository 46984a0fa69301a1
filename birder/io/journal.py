"""Tables that survive a crash: a run's rows are journaled as they come, resumed after a kill, merged at the end.

For any long run over many input files that writes rows about them (predictions, index builds, detections). The
tables are :class:`~birder.io.table_files.TableSpec` s; every row starts with the path of the input it is about.

How a run writes, and why this way:

- While a run goes on, every table is an append-only *journal*: ``<output-dir>/.partial/<table>.r<rank>.a<attempt>
  .csv``, one file per table, per rank (``torchrun``) and per attempt (each resume starts new files rather than
  appending to old ones). Rows are buffered and appended a chunk at a time, then flushed and ``fsync``-ed, the
  tables that mark inputs done (``TableSpec.marks_done``) last: an input counts as done only once such a row is
  on disk, and everything it needs was written before it. A run killed in the middle of a write leaves at most
  one unterminated line, which readers drop.
- When the run completes, the journals are merged into the final files, ``<output-dir>/<table>.<csv|parquet>``,
  in input order and without duplicates (an input's rows, one or several, all come from the attempt that last
  wrote it), each written atomically: a final file is always complete, the previous
  run's or this one's, never half of one. The journals are removed after every table is merged.
- A resume reads which inputs are done from the journals *and* the final files (so a finished run can be extended
  with new inputs), skips them, and merges old and new rows at the end. A ``run.json`` beside the tables (and one
  in ``.partial/``) records the settings that shape the rows; resuming with different ones is refused rather than
  mixing two kinds of rows in one table, and final tables left by a run with other settings are ignored.

Journals are always CSV, whatever the final format: Parquet files cannot be appended to. The caller writes each
journal in input order (the order of ``order`` in :func:`finalize_run`), so the merge streams (``heapq.merge``)
and never holds a whole table in memory.

:class:`AppendOnlyTable` is the same guarantee for a table many writers share and that is never merged (the
decisions of ``birder-review``): one locked, fsync-ed write per append; a torn last line set aside, never lost.
"""

from __future__ import annotations

import contextlib
import csv
import heapq
import io
import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from birder.errors import BirderError
from birder.io.atomic import atomic_write_path, fsync_directory
from birder.io.table_files import (
    Row,
    TableSpec,
    open_text,
    read_csv_table,
    read_table_header_and_paths,
    read_table_rows,
    write_table,
)

try:
    import fcntl
except ImportError:  # Windows: one process per file (threads still take turns)
    fcntl = None  # type: ignore[assignment]

OUTPUT_FORMATS = ("csv", "parquet")
JOURNAL_DIR = ".partial"
RUN_INFO_FILE = "run.json"
_SHOWN_SETTING_CHARS = 40  # a changed setting's values are shown up to this length
_JOURNAL_NAME = re.compile(r"^(?P<table>[A-Za-z0-9_-]+)\.r(?P<rank>\d+)\.a(?P<attempt>\d+)\.csv$")


def final_path(output_dir: Path, spec: TableSpec, file_format: str) -> Path:
    """Where table ``spec`` of a run in ``file_format`` ends up."""
    return output_dir / f"{spec.name}.{spec.fixed_format or file_format}"


# ---------------------------------------------------------------------------------------------------------------------
# Journals: append-only, chunked, fsync-ed
# ---------------------------------------------------------------------------------------------------------------------


class JournalWriter:
    """Append rows to one journal file; :meth:`commit` writes the buffered rows and makes them durable."""

    def __init__(self, path: Path, spec: TableSpec) -> None:
        self.path = path
        self.spec = spec
        self._pending: list[Row] = []
        self.rows_written = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open_text(path, "x")  # "x": never append to or clobber another attempt's journal
        self._writer = csv.writer(self._file, lineterminator="\n")
        self._writer.writerow(spec.header)
        self._sync()
        fsync_directory(path.parent)

    def add(self, rows: Iterable[Row]) -> None:
        self._pending.extend(rows)

    def commit(self) -> None:
        if self._pending:
            self.rows_written += len(self._pending)
            self._writer.writerows(self._pending)
            self._pending.clear()
            self._sync()

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self.commit()
        self._file.close()


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


def _remove_if_no_journals(journal_dir: Path) -> None:
    """Remove a journal folder that holds no journal (only its ``run.json``, if that)."""
    try:
        entries = list(journal_dir.iterdir())
        if all(entry.name == RUN_INFO_FILE for entry in entries):
            (journal_dir / RUN_INFO_FILE).unlink(missing_ok=True)
            journal_dir.rmdir()
    except OSError:
        pass  # another process of the run wrote into it meanwhile: it stays


class JournalSet:
    """This rank's journals for one attempt; rows are committed every ``chunk_size`` inputs.

    Tables commit in the order of ``specs``, those that mark inputs done last (whatever their place in ``specs``),
    so an input is marked done only after its other rows are durable.
    """

    def __init__(self, output_dir: Path, specs: Sequence[TableSpec], rank: int, attempt: int, chunk_size: int) -> None:
        if chunk_size < 1:
            raise BirderError(f"chunk size must be at least 1, got {chunk_size}")

        self.chunk_size = chunk_size
        self.rank = rank
        self.journal_dir = journal_dir = output_dir / JOURNAL_DIR
        in_commit_order = sorted(specs, key=lambda spec: spec.marks_done)  # stable: the given order otherwise
        self.writers = {
            spec.name: JournalWriter(journal_dir / f"{spec.name}.r{rank}.a{attempt}.csv", spec)
            for spec in in_commit_order
        }
        self._inputs_since_commit = 0

    def add(self, rows_by_table: Mapping[str, Iterable[Row]], num_inputs: int) -> None:
        """Buffer the rows that ``num_inputs`` inputs gave; a full chunk is committed."""
        for name, rows in rows_by_table.items():
            self.writers[name].add(rows)

        self._inputs_since_commit += num_inputs
        if self._inputs_since_commit >= self.chunk_size:
            self.commit()

    def commit(self) -> None:
        for writer in self.writers.values():
            writer.commit()
        self._inputs_since_commit = 0

    def close(self) -> None:
        self.commit()
        for writer in self.writers.values():
            writer.close()

    def __enter__(self) -> JournalSet:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        """Close (the rows of the inputs that finished become durable: a resume skips them). A run that fails
        before writing any row leaves nothing behind: its journals hold no work, and a ``.partial`` folder of
        only them would make the next run's ``--resume`` check columns that nothing was written in."""
        self.close()
        if exc_type is not None and not any(writer.rows_written for writer in self.writers.values()):
            for writer in self.writers.values():
                writer.path.unlink(missing_ok=True)
            if self.rank == 0:  # the rank that prepared the folder
                _remove_if_no_journals(self.journal_dir)


# ---------------------------------------------------------------------------------------------------------------------
# Starting and resuming a run
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResumeState:
    done: frozenset[str]  # paths already in a table that marks inputs done
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


def prepare_run(
    output_dir: Path,
    specs: Sequence[TableSpec],
    file_format: str,
    settings: Mapping[str, Any],
    resume: bool,
    *,
    columns_hint: str = "",
) -> ResumeState:
    """Get ``output_dir`` ready for a run (on rank 0 only); with ``resume``, find the inputs already done.

    Without ``resume`` the journals of an interrupted run are discarded. With it, the journals and final tables
    must have been written with the same ``settings`` and columns, else this raises :class:`BirderError` (whose
    message ends with ``columns_hint``, the caller's guess at what changed the columns, when they differ).
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
        described = ", ".join(_describe_change(key, previous.get(key), settings.get(key)) for key in changed)
        raise BirderError(
            f"cannot --resume in '{output_dir}': the earlier run used other settings ({described}); "
            "run again without --resume, or choose another --output-dir"
        )
    # Final tables of an older run with other settings (overwritten by the run being resumed) must not count
    include_final = final_settings == settings

    done: set[str] = set()
    by_name = {spec.name: spec for spec in specs}
    for table, _rank, _attempt, path in journals:
        if table in by_name:
            (header, rows) = read_csv_table(path)
            _check_header(path, header, by_name[table], columns_hint)
            if by_name[table].marks_done:
                done.update(row[0] for row in rows)

    for spec in specs if include_final else ():
        path = final_path(output_dir, spec, file_format)
        if path.is_file():
            (header, paths) = read_table_header_and_paths(path)
            _check_header(path, header, spec, columns_hint)
            if spec.marks_done:
                done.update(paths)

    journal_dir.mkdir(parents=True, exist_ok=True)
    if journal_settings is None:
        _write_json_atomic(journal_dir / RUN_INFO_FILE, {"settings": settings})

    attempt = max((attempt for (_, _, attempt, _) in journals), default=-1) + 1
    return ResumeState(frozenset(done), attempt, include_final)


def _describe_change(key: str, before: Any, now: Any) -> str:
    """A changed setting as a message says it: with both values when they are short words (a shard: ``shard 1/3
    then, 2/3 now``), else its name alone (a class list, a manifest's hash)."""
    if all(isinstance(value, str) and len(value) <= _SHOWN_SETTING_CHARS for value in (before, now)):
        return f"{key} {before} then, {now} now"
    return key


def _settings_in(path: Path) -> dict[str, Any] | None:
    info = _read_run_info(path)
    return info.get("settings") if isinstance(info, dict) else None


def _check_header(path: Path, header: list[str], spec: TableSpec, columns_hint: str) -> None:
    if header != spec.header:
        hint = f" ({columns_hint})" if columns_hint else ""
        raise BirderError(
            f"cannot --resume: {path} has other columns than this run would write{hint}; run again without --resume"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Merging into the final tables
# ---------------------------------------------------------------------------------------------------------------------


class _UnsortedSource(Exception):
    pass


def _keyed(rows: Iterable[Row], order: Mapping[str, int], source: Path) -> Iterator[tuple[int, Row]]:
    last = -1
    for row in rows:
        index = order.get(row[0])
        if index is None:
            continue  # an input that is no longer among the inputs
        if index < last:
            raise _UnsortedSource(source)
        last = index
        yield (index, row)


def _keyed_unchecked(rows: Iterable[Row], order: Mapping[str, int]) -> Iterator[tuple[int, Row]]:
    for row in rows:
        if row[0] in order:
            yield (order[row[0]], row)


def _sorted_final_rows(path: Path, spec: TableSpec, order: Mapping[str, int]) -> Iterable[tuple[int, Row]]:
    """A previous final table's rows in input order; sorted in memory only if the inputs were reordered."""
    try:
        for _ in _keyed((row[:1] for row in read_table_rows(path, spec)), order, path):
            pass
    except _UnsortedSource:
        return sorted(_keyed_unchecked(read_table_rows(path, spec), order), key=lambda item: item[0])

    return _keyed(read_table_rows(path, spec), order, path)


def _tagged(items: Iterable[tuple[int, Row]], rank: int) -> Iterator[tuple[int, int, Row]]:
    for index, row in items:
        yield (index, rank, row)


def merged_rows(
    output_dir: Path, spec: TableSpec, file_format: str, order: Mapping[str, int], include_final: bool
) -> Iterator[Row]:
    """Every row of table ``spec`` from the journals (and the previous final table), in input order, deduplicated.

    An input may have several rows (one per detected box); they are taken together from one source. An input
    found in several sources (a chunk redone after a crash) keeps the rows of the newest attempt: an attempt
    killed in the middle of the input's rows left only some of them, the attempt that marked it done all.
    """
    # (attempt, journal): the newest attempt first among equal inputs; the previous final table is the oldest
    sources: list[tuple[tuple[int, int], Iterable[tuple[int, Row]]]] = []
    for table, _rank, attempt, path in list_journals(output_dir):
        if table == spec.name:
            (_, rows) = read_csv_table(path)
            sources.append(((-attempt, len(sources)), _keyed(rows, order, path)))

    previous = final_path(output_dir, spec, file_format)
    if include_final and previous.is_file():
        sources.append(((1, len(sources)), _sorted_final_rows(previous, spec, order)))

    ranked = sorted(sources, key=lambda item: item[0])
    (last_index, chosen) = (-1, -1)
    merged = heapq.merge(*(_tagged(rows, rank) for (rank, (_, rows)) in enumerate(ranked)), key=lambda t: t[:2])
    for index, rank, row in merged:
        if index != last_index:
            (last_index, chosen) = (index, rank)
        if rank == chosen:
            yield row


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

    ``order`` maps each input's path to its place. ``on_row[table]`` sees each final row once, in order (e.g. to
    compute a summary). ``run_info()``, called after the merge, is written to ``run.json`` beside the settings the
    run started with.
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
# A shared append-only table (a log of decisions): many writers, every row durable once appended
# ---------------------------------------------------------------------------------------------------------------------


class AppendOnlyTable:
    """One CSV file that only grows, written by several threads or processes at once (``birder-review``'s
    ``reviews.csv``): every :meth:`append` is one ``write`` of whole lines under an exclusive lock, then ``fsync``.

    A process killed in the middle of a write leaves one unterminated last line. Whoever opens or appends next
    finds it (under the lock), moves its bytes to ``<file>.torn`` (kept, never silently dropped) and cuts the file
    back to its last complete line, so the next row starts on a line of its own; the rows before are untouched.
    Readers (:meth:`read_new`) take complete lines only, from where they stopped: rows other processes appended
    meanwhile come in file order.
    """

    def __init__(self, path: Path, header: Sequence[str]) -> None:
        self.path = Path(path)
        self.header = list(header)
        self.torn_path = self.path.with_name(self.path.name + ".torn")
        self._offset = 0  # bytes of complete lines read so far (the header included)
        self._thread_lock = threading.Lock()

    def open(self) -> list[str]:
        """Create the file with its header if absent, check the header, repair a torn last line; returns what
        was repaired (one line each, for the caller to show)."""
        with self._locked() as handle:
            notes = self._repair(handle)
            if os.fstat(handle.fileno()).st_size == 0:  # new (or killed before its header reached the disk)
                os.write(handle.fileno(), _csv_line(self.header))
                os.fsync(handle.fileno())
                fsync_directory(self.path.parent)
        self.check_header()
        return notes

    def check_header(self) -> None:
        """Check the file's header (a file of another kind is refused in one line); rows are read after it."""
        with self._thread_lock, open(self.path, "rb") as handle:
            first = handle.readline()
        found = next(csv.reader([first.decode("utf-8", "surrogateescape")]), [])
        if found != self.header or not first.endswith(b"\n"):
            raise BirderError(
                f"{self.path} has other columns than this program writes ({', '.join(found[:6])}...): "
                "it is not a file of this kind; move it away or name another file"
            )
        self._offset = len(first)

    def append(self, rows: Sequence[Sequence[str]]) -> list[str]:
        """Append ``rows`` durably (one write, then fsync); returns the repairs made first (a torn line)."""
        if not rows:
            return []
        data = b"".join(_csv_line(row) for row in rows)
        with self._locked() as handle:
            notes = self._repair(handle)
            os.write(handle.fileno(), data)  # O_APPEND: at the end, whoever else appended meanwhile
            os.fsync(handle.fileno())
        return notes

    def read_new(self) -> tuple[list[list[str]], int]:
        """``(rows, malformed)``: the complete rows appended since the last call (by anyone), and how many complete
        lines had the wrong number of cells (skipped)."""
        with self._thread_lock, open(self.path, "rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        end = data.rfind(b"\n") + 1  # a line still being written (or torn) waits
        self._offset += end
        (rows, malformed) = ([], 0)
        text = data[:end].decode("utf-8", "surrogateescape")
        for row in csv.reader(io.StringIO(text, newline="")):
            if len(row) == len(self.header):
                rows.append(row)
            elif row:
                malformed += 1
        return (rows, malformed)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[Any]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._thread_lock:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
            with os.fdopen(fd, "r+b", buffering=0) as handle:
                if fcntl is not None:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # released when the file closes
                yield handle

    def _repair(self, handle: Any) -> list[str]:
        """Cut an unterminated last line off (moved to ``.torn``); called with the lock held."""
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return []
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return []
        block = min(size, 1 << 16)
        while True:  # the start of the last line
            handle.seek(size - block)
            data = handle.read(block)
            cut = data.rfind(b"\n")
            if cut >= 0 or block == size:
                start = size - block + cut + 1
                break
            block = min(size, block * 2)
        handle.seek(start)
        fragment = handle.read()
        with open(self.torn_path, "ab") as torn:
            torn.write(fragment + b"\n")
            torn.flush()
            os.fsync(torn.fileno())
        os.ftruncate(handle.fileno(), start)
        os.fsync(handle.fileno())
        return [
            f"{self.path}: its last line was cut off mid-write ({len(fragment)} bytes, a crash while saving); "
            f"it was moved to {self.torn_path.name} and every earlier row kept"
        ]


def _csv_line(row: Sequence[str]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(row)
    return buffer.getvalue().encode("utf-8", "surrogateescape")
