"""Merging the output folders of ``birder-predict --shard K/N`` jobs as one folder, in the order of the
photo list (the manifest's rows, or the photos found under the inputs).

``python -m birder.tools merge-results`` (:mod:`birder.tools.merge_results`) is the command line.

Every table the shards wrote (results, failures, and probabilities, logits, embeddings, ... when asked for) is
merged into one of the same name and format, and ``run.json`` records the shards' common settings. The shards are
contiguous blocks of the list (:mod:`birder.runs.photo_lists`), so each table is the shards' tables one after
the other: streamed, never held in memory (only the photo list is). Photos of the list that no shard classified
or failed (a shard that is absent, or cut short) are counted and written to ``missing.txt``, one path per line;
the same ``birder-predict`` command without ``--shard`` and with ``--resume --output-dir MERGED`` classifies just
those.

Refused, in one line: shards of runs with different settings (model, weights, --top-k, format, ...), of different
manifests or photo lists, of different splits (2/3 and 1/4), the same shard twice, an unfinished shard (its
``.partial/`` folder: resume it first). What a shard derives from its own photos alone (events, exports, feature
files) is not merged: a warning names it.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from birder.errors import BirderError
from birder.geo.results import find_table
from birder.inference.dataset import discover_images
from birder.io.atomic import atomic_write_path, atomic_write_text
from birder.io.journal import JOURNAL_DIR, RUN_INFO_FILE
from birder.io.outputs import OutputFolder, same_file
from birder.io.table_files import (
    flat_header,
    open_text,
    read_csv_table,
    read_table_header_and_paths,
    stored_batch,
    stored_schema,
)
from birder.runs.photo_lists import WHOLE, Manifest, PhotoBlock, parse_shard, photo_list_sha256, read_manifest

logger = logging.getLogger(__name__)

MISSING_FILE = "missing.txt"
# The tables with one row per photo dealt with: classified or not readable (a detection run's results have a row
# per box, its photos table one per photo)
_PHOTO_TABLES = ("results", "failures")
_DETECTION_PHOTO_TABLES = ("photos", "failures")
# Settings that differ between the shards of one run by design
_PER_SHARD_SETTINGS = ("shard",)
_SHOWN_VALUE_CHARS = 60
_PARQUET_BATCH_ROWS = 8192


# ---------------------------------------------------------------------------------------------------------------------
# The shards
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardOutput:
    """One shard's output folder and what its ``run.json`` says."""

    folder: Path
    info: dict[str, Any]
    shard: PhotoBlock

    @property
    def settings(self) -> dict[str, Any]:
        return self.info["settings"]


def read_shard_output(folder: str | os.PathLike) -> ShardOutput:
    """A finished ``birder-predict`` output folder (a run with ``--shard`` or ``--manifest``), or a one-line error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BirderError(f"'{folder}' is not a folder")
    if (folder / JOURNAL_DIR).exists():
        raise BirderError(
            f"'{folder}' holds an unfinished run ({JOURNAL_DIR}/): finish it with its birder-predict command "
            "plus --resume, then merge"
        )
    try:
        info = json.loads((folder / RUN_INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict) or not isinstance(info.get("settings"), dict):
        raise BirderError(f"'{folder}' has no readable {RUN_INFO_FILE}: not a finished birder-predict output")

    settings = info["settings"]
    if "manifest" not in settings and "inputs" not in settings:
        raise BirderError(
            f"'{folder}' is a run without --shard or --manifest: nothing says which part of which photos it holds"
        )
    return ShardOutput(folder, info, parse_shard(settings.get("shard", str(WHOLE))))


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings every shard of one run shares; a manifest by its content (it may sit elsewhere per machine)."""
    shared = {key: value for (key, value) in settings.items() if key not in _PER_SHARD_SETTINGS}
    if isinstance(shared.get("manifest"), dict):
        shared["manifest"] = shared["manifest"].get("sha256")
    return shared


def _shown(value: Any) -> str:
    return json.dumps(value, default=str)


def check_shards(outputs: Sequence[ShardOutput]) -> list[ShardOutput]:
    """The shards in their order, once they are known to be parts of one run and one split; else a one-line error."""
    first = outputs[0]
    expected = _comparable(first.settings)
    for other in outputs[1:]:
        settings = _comparable(other.settings)
        for key in sorted(set(expected) | set(settings)):
            if expected.get(key) == settings.get(key):
                continue
            if key == "manifest":
                paths = [output.settings.get("manifest", {}).get("path") for output in (first, other)]
                detail = f" ({paths[0]} and {paths[1]}, sha256 differs)"
            else:
                values = [_shown(expected.get(key)), _shown(settings.get(key))]
                detail = f" ({values[0]} and {values[1]})" if max(map(len, values)) <= _SHOWN_VALUE_CHARS else ""
            raise BirderError(
                f"'{first.folder}' and '{other.folder}' were run with a different {key}{detail}: "
                "only the shards of one run can be merged"
            )

    by_index: dict[int, ShardOutput] = {}
    for output in outputs:
        if output.shard.count != first.shard.count:
            raise BirderError(
                f"'{first.folder}' is shard {first.shard} but '{output.folder}' is shard {output.shard}: shards of "
                "different splits overlap; merge the shards of one split"
            )
        seen = by_index.get(output.shard.index)
        if seen is not None:
            raise BirderError(
                f"'{seen.folder}' and '{output.folder}' are both shard {output.shard}: overlapping outputs "
                "(give each shard once)"
            )
        by_index[output.shard.index] = output
    return [by_index[index] for index in sorted(by_index)]


# ---------------------------------------------------------------------------------------------------------------------
# The photo list the shards split
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhotoList:
    """The list the shards were cut from, as the merge finds it again.

    ``entries`` is ``None`` when it cannot be found again (inputs that changed since): the missing photos are then
    counted, not named. ``in_shard(entry, output)`` is the path a shard's rows give that entry; ``key(path,
    output)`` how a shard's row path compares with it; ``as_now(entry)`` the path as seen from here (for
    ``missing.txt``).
    """

    total: int
    entries: list[str] | None
    describe: str
    in_shard: Callable[[str, ShardOutput], str]
    key: Callable[[str, ShardOutput], str]
    as_now: Callable[[str], str]
    settings: dict[str, Any]  # what the merged run.json records about the list


def _same(path: str, output: ShardOutput) -> str:
    return path


def find_photo_list(shards: Sequence[ShardOutput], manifest: str | os.PathLike | None) -> PhotoList:
    """The shards' manifest (``manifest``, else where a shard's run.json says it is), or their inputs' photos."""
    recorded = shards[0].settings.get("manifest")
    if isinstance(recorded, dict):
        listed = _read_recorded_manifest(shards, recorded, manifest)

        def in_shard(entry: str, output: ShardOutput) -> str:
            # A relative entry names the photo beside the manifest the shard read (machines may mount it elsewhere)
            return listed.photo(entry, Path(output.settings["manifest"]["path"]).parent)

        settings = {"manifest": listed.settings()}
        return PhotoList(
            len(listed.entries), listed.entries, f"in {listed.path}", in_shard, _same, listed.photo, settings
        )

    inputs = shards[0].settings["inputs"]
    (entries, reason) = _found_again(shards[0].info, inputs["sha256"])
    if reason is not None:
        logger.warning("cannot name the missing photos: %s; they are counted only", reason)

    def key(path: str, output: ShardOutput) -> str:
        # Rows carry the paths as the shard's command line spelled them: relative ones to its working folder
        return os.path.abspath(os.path.join(output.info.get("cwd", ""), path))

    return PhotoList(inputs["photos"], entries, "found", lambda entry, output: entry, key, lambda entry: entry, {})


def _read_recorded_manifest(
    shards: Sequence[ShardOutput], recorded: dict[str, Any], given: str | os.PathLike | None
) -> Manifest:
    candidates = [Path(given)] if given is not None else []
    candidates += [Path(output.settings["manifest"]["path"]) for output in shards]
    path = next((candidate for candidate in candidates if candidate.is_file()), None)
    if path is None:
        shown = given if given is not None else recorded["path"]
        raise BirderError(f"the shards' manifest '{shown}' is not there: pass --manifest FILE (where it is now)")
    listed = read_manifest(path)
    if listed.sha256 != recorded["sha256"]:
        raise BirderError(f"'{path}' is not the manifest the shards ran on (its sha256 differs)")
    return listed


def _found_again(info: dict[str, Any], sha256: str) -> tuple[list[str] | None, str | None]:
    """``(the photos found under the shards' inputs, None)``, or ``(None, why not)``."""
    inputs = info.get("inputs")
    if not inputs:
        return (None, "run.json does not record the inputs")
    try:
        found = [os.path.abspath(path) for path in discover_images(inputs)]
    except BirderError as exc:
        return (None, str(exc))
    if photo_list_sha256(found) != sha256:
        return (None, f"the photos under {', '.join(inputs)} changed since the shards ran")
    return (found, None)


# ---------------------------------------------------------------------------------------------------------------------
# Missing photos
# ---------------------------------------------------------------------------------------------------------------------


def _done_tables(output: ShardOutput) -> list[Path]:
    tables = output.settings.get("tables", ())
    names = _DETECTION_PHOTO_TABLES if "photos" in tables else _PHOTO_TABLES
    return [_table_file(output, name) for name in names if name in tables]


def _paths_of(path: Path) -> Iterator[str]:
    return read_table_header_and_paths(path)[1]


def missing_in_shard(
    expected: Iterable[str], tables: Sequence[Path], key: Callable[[str, ShardOutput], str], output: ShardOutput
) -> Iterator[int]:
    """The places in ``expected`` (a shard's block of the list) of the photos none of ``tables`` has a row for.

    One pass over each table's path column, in step with the block: a shard writes its tables in the list's order
    (an input's rows together). A row left over at the end is not in the block, or out of order: refused.
    """
    streams = [(key(path, output) for path in _paths_of(table)) for table in tables]
    heads = [next(stream, None) for stream in streams]
    for place, photo in enumerate(expected):
        found = False
        for i, stream in enumerate(streams):
            while heads[i] == photo:
                found = True
                heads[i] = next(stream, None)
        if not found:
            yield place
    for table, head in zip(tables, heads, strict=True):
        if head is not None:
            raise BirderError(
                f"'{table}' has a row for '{head}', which is not in the part of the photo list that shard "
                f"{output.shard} covers (or not in its order): was '{output.folder}' written by another run?"
            )


def _distinct_photos(tables: Sequence[Path]) -> int:
    """How many photos ``tables`` have rows for (a photo's rows sit together; no photo is in two tables)."""
    count = 0
    for table in tables:
        last = None
        for path in _paths_of(table):
            count += path != last
            last = path
    return count


def write_missing(
    shards: Sequence[ShardOutput], photos: PhotoList, count: int, destination: Path
) -> tuple[int | None, Path | None]:
    """Write the list's photos no shard has (absent shards' blocks included) to ``destination``; returns ``(how
    many, the file or None when none)``. Without the list, the count alone (``destination`` is not written)."""
    by_index = {output.shard.index: output for output in shards}
    blocks = [(PhotoBlock(index, count), by_index.get(index)) for index in range(1, count + 1)]
    if photos.entries is None:
        destination.unlink(missing_ok=True)  # an earlier merge's list would name the wrong photos
        missing = 0
        for shard, output in blocks:
            (start, stop) = shard.bounds(photos.total)
            missing += stop - start - (_distinct_photos(_done_tables(output)) if output is not None else 0)
        return (missing, None)

    entries = photos.entries
    missing = 0
    with atomic_write_path(destination) as tmp, open(tmp, "w", encoding="utf-8", errors="surrogateescape") as handle:
        for shard, output in blocks:
            (start, stop) = shard.bounds(photos.total)
            if output is None:
                places: Iterable[int] = range(stop - start)
            else:
                expected = (photos.in_shard(entry, output) for entry in entries[start:stop])
                tables = _done_tables(output)
                places = missing_in_shard(expected, tables, photos.key, output)
            for place in places:
                handle.write(photos.as_now(entries[start + place]) + "\n")
                missing += 1
    if missing == 0:
        destination.unlink()
        return (0, None)
    return (missing, destination)


# ---------------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------------


def _table_file(output: ShardOutput, name: str) -> Path:
    path = find_table(output.folder, name, output.settings.get("format"))
    if path is None:
        raise BirderError(f"'{output.folder}' has no {name} table: not a finished birder-predict output")
    return path


def merge_table(sources: Sequence[Path], destination: Path) -> int:
    """Write ``sources`` (tables of one kind and format, in the list's order) one after the other to
    ``destination``, atomically and streamed; returns the number of rows. Different columns are refused."""
    if destination.suffix == ".parquet":
        return _merge_parquet(sources, destination)

    headers = [read_csv_table(source)[0] for source in sources]
    _check_same_columns(sources, headers)
    count = 0
    with atomic_write_path(destination) as tmp, open_text(tmp, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(headers[0])
        for source in sources:
            for row in read_csv_table(source)[1]:
                writer.writerow(row)
                count += 1
    return count


def _merge_parquet(sources: Sequence[Path], destination: Path) -> int:
    import pyarrow.parquet as pq

    # Embeddings are merged into the list column (FixedSizeList<float32>), also from shards written before it
    schemas = [stored_schema(pq.read_schema(source)) for source in sources]
    _check_same_columns(sources, [flat_header(schema) for schema in schemas])
    for source, schema in zip(sources[1:], schemas[1:], strict=True):
        if not schema.equals(schemas[0], check_metadata=False):
            raise BirderError(f"'{source}' and '{sources[0]}' have columns of different types: not one run's")
    count = 0
    with atomic_write_path(destination) as tmp, pq.ParquetWriter(tmp, schemas[0]) as writer:
        for source in sources:
            with pq.ParquetFile(source) as parquet:
                for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
                    writer.write_batch(stored_batch(batch))
                    count += batch.num_rows
    return count


def _check_same_columns(sources: Sequence[Path], headers: Sequence[list[str]]) -> None:
    for source, header in zip(sources[1:], headers[1:], strict=True):
        if header != headers[0]:
            raise BirderError(f"'{source}' and '{sources[0]}' have different columns: not one run's")


def _not_merged(shards: Sequence[ShardOutput], table_files: set[str]) -> list[str]:
    """What the shards hold beside their tables and run.json (events, exports, feature files, pictures)."""
    names = set()
    for output in shards:
        for entry in output.folder.iterdir():
            if entry.name not in table_files and entry.name != RUN_INFO_FILE and not entry.name.startswith("."):
                names.add(entry.name + ("/" if entry.is_dir() else ""))
    return sorted(names)


# ---------------------------------------------------------------------------------------------------------------------
# The merge
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeReport:
    output_dir: Path
    tables: dict[str, tuple[Path, int]]  # name -> (merged file, rows)
    shards: list[str]  # "K/N" of the shards merged
    count: int  # N, the shards of the split
    absent: list[int]  # shard numbers not given
    photos: int  # in the list
    described: str  # where the list comes from
    missing: int | None  # photos in no shard's tables
    missing_file: Path | None
    not_merged: list[str]


def merge_results(
    outputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    manifest: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
) -> MergeReport:
    """Merge the shards in ``outputs`` into ``output_dir`` (see the module's docstring); a folder that holds an
    earlier run's results is refused unless ``overwrite`` (:mod:`birder.io.outputs`)."""
    from birder.runs.predict import PREDICTION_OUTPUTS
    from birder.runs.predict import PROG as PREDICT_PROG

    output_dir = Path(output_dir)
    shards = check_shards([read_shard_output(folder) for folder in outputs])
    for output in shards:
        if same_file(output_dir, output.folder):
            raise BirderError(f"the merged folder '{output_dir}' is one of the shards: choose another -o")
    # The merged folder is a birder-predict output (a resume there classifies the missing photos)
    folder = OutputFolder(output_dir, PREDICT_PROG, PREDICTION_OUTPUTS, option="-o", can_resume=False)
    shard_files = [output.folder / RUN_INFO_FILE for output in shards]
    shard_files += [_table_file(output, name) for output in shards for name in output.settings.get("tables", ())]
    folder.check(inputs=shard_files, overwrite=overwrite)
    count = shards[0].shard.count
    absent = sorted(set(range(1, count + 1)) - {output.shard.index for output in shards})
    if absent:
        shown = ", ".join(map(str, absent))
        logger.warning("shard(s) %s of %d not given: their photos count as missing", shown, count)

    photos = find_photo_list(shards, manifest)
    folder.claim(inputs=shard_files, overwrite=overwrite)
    (missing, missing_file) = write_missing(shards, photos, count, output_dir / MISSING_FILE)

    tables: dict[str, tuple[Path, int]] = {}
    for name in shards[0].settings.get("tables", ()):
        sources = [_table_file(output, name) for output in shards]
        destination = output_dir / sources[0].name
        tables[name] = (destination, merge_table(sources, destination))

    settings = {key: value for (key, value) in shards[0].settings.items() if key not in ("shard", "inputs")}
    settings.update(photos.settings)
    # The merged folder's settings are an unsharded run's: birder-predict ... --resume --output-dir MERGED (same
    # options, no --shard) accepts its tables and classifies only the missing photos
    info = {
        "settings": settings,
        "photos": photos.total,
        "missing": missing,
        "missing_file": missing_file.name if missing_file is not None else None,
        "shards_absent": absent,
        "merged_from": [
            {
                "output": os.path.abspath(output.folder),
                "shard": str(output.shard),
                "summary": output.info.get("summary"),
            }
            for output in shards
        ],
    }
    atomic_write_text(output_dir / RUN_INFO_FILE, json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    table_files = {path.name for (path, _) in tables.values()}
    not_merged = _not_merged(shards, table_files)
    if not_merged:
        logger.warning("not merged (made from each shard's photos alone): %s", ", ".join(not_merged))
    folder.finish()
    return MergeReport(
        output_dir,
        tables,
        [str(output.shard) for output in shards],
        count,
        absent,
        photos.total,
        photos.describe,
        missing,
        missing_file,
        not_merged,
    )
