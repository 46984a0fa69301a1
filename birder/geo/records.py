"""Occurrence records for the prior: read from CSV or Parquet, cleaned, matched to a model's classes.

A GBIF or Darwin Core download is read as it is: its column names (``species`` or ``scientificName``,
``decimalLatitude``, ``decimalLongitude``, ``eventDate``, optional ``individualCount`` and ``occurrenceStatus``)
are found case-insensitively, and GBIF's tab-separated "simple CSV" is told from a comma-separated file by its
header line. Everything is vectorised (pyarrow), so millions of records take seconds.

Records that cannot be used are counted, never fatal (:class:`RecordReport` says each kind in one line):

- no usable position (missing, not a number, outside -90..90 / -180..180, or exactly (0, 0), the usual
  placeholder for an unknown position): skipped;
- no usable date (missing, unparseable, or coarser than a day): used for the place, not for the season;
- a name that is no class of the model (after the mapping file, if any): skipped;
- an absence (``individualCount`` 0 or ``occurrenceStatus`` absent): skipped.

A record of many individuals weighs ``1 + ln(count)``: a flock is more evidence than one bird, but one sighting
of 5,000 starlings must not outweigh a thousand records of other species.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from birder.errors import BirderError, one_line
from birder.geo.grid import valid_coordinates
from birder.geo.season import day_bins
from birder.io.table_files import import_pyarrow

# Column names tried in order (case-insensitively) for each field; the first present wins
COLUMN_CANDIDATES: dict[str, tuple[str, ...]] = {
    "species": ("species", "scientificName", "scientific_name", "name"),
    "latitude": ("decimalLatitude", "latitude", "lat"),
    "longitude": ("decimalLongitude", "longitude", "lon", "lng"),
    "date": ("eventDate", "date", "observed_on"),
    "count": ("individualCount", "count"),
    "status": ("occurrenceStatus",),
}
_REQUIRED = ("species", "latitude", "longitude")
# A plain decimal number (what a coordinate or a count cell holds); anything else is not a number
_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
_EXAMPLES = 5


@dataclass
class Records:
    """Usable records, one element per record."""

    latitudes: npt.NDArray[np.float64]
    longitudes: npt.NDArray[np.float64]
    day_bins: npt.NDArray[np.int16]  # -1: no usable date
    classes: npt.NDArray[np.int32]  # index into the class list
    weights: npt.NDArray[np.float32]

    def __len__(self) -> int:
        return len(self.classes)


@dataclass
class RecordReport:
    """What reading the records found: counts per kind of problem, said in one line each."""

    source: str
    read: int = 0
    used: int = 0
    bad_position: int = 0
    undated: int = 0
    absences: int = 0
    unknown_records: int = 0
    unknown_names: list[str] = field(default_factory=list)  # every distinct unknown name
    malformed_lines: int = 0

    def lines(self) -> list[str]:
        out = [f"{self.used:,} of {self.read:,} records used from {self.source}"]
        if self.malformed_lines:
            out.append(f"{self.malformed_lines:,} malformed lines skipped (wrong number of fields)")
        if self.bad_position:
            out.append(
                f"{self.bad_position:,} records without a usable position skipped (missing, not a number, out of "
                "range, or (0, 0))"
            )
        if self.undated:
            out.append(
                f"{self.undated:,} records with a missing or unparseable date (or coarser than a day): used for the "
                "place, not the season"
            )
        if self.unknown_records:
            examples = ", ".join(f"'{name}'" for name in self.unknown_names[:_EXAMPLES])
            more = " ..." if len(self.unknown_names) > _EXAMPLES else ""
            named = f"; {len(self.unknown_names):,} names, e.g. {examples}{more}" if examples else ""
            out.append(
                f"{self.unknown_records:,} records without a name that is a class of the model skipped{named} "
                "(map names with --mapping)"
            )
        if self.absences:
            out.append(f"{self.absences:,} absence records (count 0 or occurrenceStatus absent) skipped")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "used": self.used,
            "bad_position": self.bad_position,
            "undated": self.undated,
            "absences": self.absences,
            "unknown_records": self.unknown_records,
            "unknown_names": len(self.unknown_names),
            "malformed_lines": self.malformed_lines,
        }


# ---------------------------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------------------------


def normalize_name(name: str) -> str:
    """The form names are compared in: case and spacing (and underscores, common in folder names) do not matter."""
    return " ".join(name.replace("_", " ").split()).casefold()


def read_mapping_file(path: str | os.PathLike, class_names: Sequence[str]) -> dict[str, str]:
    """Record name -> class name, from a two-column CSV file (a header row is recognised and skipped)."""
    known = set(class_names)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            # (line in the file, row) of the rows with a value: blank lines are skipped, lines keep their numbers
            rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except OSError as exc:
        raise BirderError(f"cannot read mapping file '{path}': {one_line(exc)}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise BirderError(
            f"mapping file '{path}' is not a UTF-8 CSV of record name,class name: {one_line(exc)}"
        ) from None

    mapping: dict[str, str] = {}
    for position, (line, row) in enumerate(rows):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise BirderError(f"mapping file '{path}' line {line}: expected 'record name,class name'")
        (source, target) = (row[0].strip(), row[1].strip())
        if target not in known:
            if position == 0:
                continue  # a header row
            raise BirderError(
                f"mapping file '{path}' line {line}: '{one_line(target, 80)}' is not a class of the model"
            )
        mapping[normalize_name(source)] = target
    return mapping


class NameMatcher:
    """Record names -> class indices: the mapping file first, then the class names themselves; a scientific name
    with its authorship (``Parus major Linnaeus, 1758``) also matches by its first two words."""

    def __init__(self, class_names: Sequence[str], mapping: Mapping[str, str] | None = None) -> None:
        index = {normalize_name(name): i for (i, name) in enumerate(class_names)}
        self._lookup = dict(index)
        for source, target in (mapping or {}).items():
            self._lookup[normalize_name(source)] = index[normalize_name(target)]

    def match(self, name: str) -> int:
        key = normalize_name(name)
        found = self._lookup.get(key)
        if found is None:
            found = self._lookup.get(" ".join(key.split()[:2]), -1)
        return found


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def _resolve_columns(header: Sequence[str], overrides: Mapping[str, str] | None, source: Path) -> dict[str, str]:
    """Field -> the file's column name, for the fields the file has."""
    by_lower = {name.strip().casefold(): name for name in header}
    resolved: dict[str, str] = {}
    for key, candidates in COLUMN_CANDIDATES.items():
        wanted = (overrides or {}).get(key)
        names = (wanted,) if wanted else candidates
        for name in names:
            if name.casefold() in by_lower:
                resolved[key] = by_lower[name.casefold()]
                break
        else:
            if wanted:
                raise BirderError(f"{source}: no column '{wanted}' (columns: {', '.join(header[:20])})")
    # GBIF fills `species` only for records identified to species; `scientificName` always: use it where empty
    if resolved.get("species", "").casefold() == "species" and "scientificname" in by_lower:
        resolved["species_fallback"] = by_lower["scientificname"]
    missing = [key for key in _REQUIRED if key not in resolved]
    if missing:
        tried = "; ".join(f"{key}: {', '.join(COLUMN_CANDIDATES[key])}" for key in missing)
        raise BirderError(f"{source}: no {' / '.join(missing)} column (looked for {tried})")
    return resolved


def _csv_dialect(path: Path) -> tuple[str, str | bool]:
    """The delimiter (tab or comma, whichever the header line has more of) and quote character of a CSV file.

    GBIF's tab-separated downloads do not quote, and a stray quote in a value must not swallow the lines after
    it: a tab-separated file is read without quoting unless its header is quoted.
    """
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        header = handle.readline()
    delimiter = "\t" if header.count("\t") > header.count(",") else ","
    quoted = delimiter == "," or header.lstrip().startswith('"')
    return (delimiter, '"' if quoted else False)


def _read_table(path: Path, overrides: Mapping[str, str] | None) -> tuple[Any, dict[str, str], int]:
    """The file's useful columns (strings for CSV, as stored for Parquet), their names, and malformed lines."""
    pa = import_pyarrow("reading occurrence records", "geo")
    if not path.is_file():
        raise BirderError(f"records file '{path}' does not exist")

    if path.suffix.lower() == ".parquet":
        try:
            header = pa.parquet.read_schema(path).names
            columns = _resolve_columns(header, overrides, path)
            table = pa.parquet.read_table(path, columns=sorted(set(columns.values())))
        except (OSError, pa.ArrowException) as exc:
            raise BirderError(f"cannot read records file '{path}': {' '.join(str(exc).split())}") from None
        return (table, columns, 0)

    (delimiter, quote_char) = _csv_dialect(path)
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        header = next(csv.reader([handle.readline().rstrip("\r\n")], delimiter=delimiter), [])
    columns = _resolve_columns(header, overrides, path)
    malformed = [0]

    def skip_row(_row: Any) -> str:
        malformed[0] += 1
        return "skip"

    wanted = sorted(set(columns.values()))
    try:
        table = pa.csv.read_csv(
            path,
            parse_options=pa.csv.ParseOptions(
                delimiter=delimiter,
                quote_char=quote_char,
                invalid_row_handler=skip_row,
            ),
            convert_options=pa.csv.ConvertOptions(
                include_columns=wanted,
                column_types=dict.fromkeys(wanted, pa.string()),
                strings_can_be_null=True,
            ),
        )
    except (OSError, pa.ArrowException) as exc:
        raise BirderError(f"cannot read records file '{path}': {' '.join(str(exc).split())}") from None
    return (table, columns, malformed[0])


def _as_float(pa: Any, column: Any) -> npt.NDArray[np.float64]:
    """Numbers of a column (strings or numeric); anything that is not a number becomes NaN."""
    pc = pa.compute
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        is_number = pc.fill_null(pc.match_substring_regex(column, _NUMBER), False)
        column = pc.if_else(is_number, pc.utf8_trim_whitespace(column), pa.scalar(None, column.type))
    column = pc.cast(column, pa.float64())
    return column.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def _day_bins(pa: Any, column: Any) -> npt.NDArray[np.int16]:
    """The day-of-year bin of each record's date, -1 where there is no day-precise date.

    Text is read as an ISO date (``2019-05-14``, with or without a time; an interval by its first day); a date
    that does not exist (``2019-02-30``) is refused rather than rolled over.
    """
    pc = pa.compute
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        dates = pc.cast(column, pa.timestamp("s")) if pa.types.is_date(column.type) else column
    else:
        text = pc.utf8_slice_codeunits(pc.cast(column, pa.string()), 0, 10)
        dates = pc.strptime(text, format="%Y-%m-%d", unit="s", error_is_null=True)
        round_trip = pc.fill_null(pc.equal(pc.strftime(dates, format="%Y-%m-%d"), text), False)
        dates = pc.if_else(round_trip, dates, pa.scalar(None, dates.type))
    day = pc.day_of_year(dates).to_numpy(zero_copy_only=False)
    leap = pc.is_leap_year(dates).to_numpy(zero_copy_only=False)
    valid = ~np.isnan(day.astype(np.float64))
    bins = np.full(len(day), -1, dtype=np.int16)
    bins[valid] = day_bins(day[valid].astype(np.int64), leap[valid].astype(bool))
    return bins


def _names(pa: Any, table: Any, columns: Mapping[str, str]) -> Any:
    pc = pa.compute
    names = pc.cast(table.column(columns["species"]), pa.string())
    if "species_fallback" in columns:
        empty = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(names), ""), True)
        fallback = pc.cast(table.column(columns["species_fallback"]), pa.string())
        names = pc.if_else(empty, fallback, names)
    return names


def _class_indices(pa: Any, names: Any, matcher: NameMatcher, report: RecordReport) -> npt.NDArray[np.int32]:
    """Each record's class index (-1: no name, or not a class); unknown names are collected in ``report``."""
    encoded = names.combine_chunks().dictionary_encode() if hasattr(names, "combine_chunks") else names
    encoded = encoded.dictionary_encode() if not pa.types.is_dictionary(encoded.type) else encoded
    distinct = encoded.dictionary.to_pylist()
    lookup = np.array([matcher.match(name) if name and name.strip() else -1 for name in distinct] + [-1], np.int32)
    indices = encoded.indices.fill_null(len(distinct)).to_numpy(zero_copy_only=False)
    classes = lookup[indices]

    unknown = np.array([i for (i, name) in enumerate(distinct) if lookup[i] < 0 and name and name.strip()], np.int64)
    if len(unknown):
        per_name = np.bincount(indices, minlength=len(distinct) + 1)[unknown]
        order = np.argsort(-per_name, kind="stable")  # the most frequent first: the ones worth mapping
        report.unknown_names = [distinct[int(i)] for i in unknown[order]]
    return classes


def _absences(pa: Any, table: Any, columns: Mapping[str, str], counts: npt.NDArray[np.float64]) -> npt.NDArray[Any]:
    absent = counts == 0
    if "status" in columns:
        status = pa.compute.utf8_lower(pa.compute.cast(table.column(columns["status"]), pa.string()))
        absent |= pa.compute.fill_null(pa.compute.equal(status, "absent"), False).to_numpy(zero_copy_only=False)
    return absent


def read_records(
    path: str | os.PathLike,
    class_names: Sequence[str],
    *,
    mapping: Mapping[str, str] | None = None,
    columns: Mapping[str, str] | None = None,
) -> tuple[Records, RecordReport]:
    """The usable records of a CSV or Parquet file for a model with ``class_names``, and what was left out.

    ``mapping``: record name -> class name (see :func:`read_mapping_file`). ``columns``: field -> column name, for
    files whose columns have other names (fields: species, latitude, longitude, date, count, status).
    """
    pa = import_pyarrow("reading occurrence records", "geo")
    path = Path(path)
    (table, found, malformed) = _read_table(path, columns)
    report = RecordReport(str(path), read=table.num_rows, malformed_lines=malformed)

    latitudes = _as_float(pa, table.column(found["latitude"]))
    longitudes = _as_float(pa, table.column(found["longitude"]))
    good_position = valid_coordinates(latitudes, longitudes)
    classes = _class_indices(pa, _names(pa, table, found), NameMatcher(class_names, mapping), report)
    counts = _as_float(pa, table.column(found["count"])) if "count" in found else np.full(len(classes), np.nan)
    absent = _absences(pa, table, found, counts)
    bins = _day_bins(pa, table.column(found["date"])) if "date" in found else np.full(len(classes), -1, np.int16)

    report.bad_position = int((~good_position).sum())
    keep = good_position & (classes >= 0) & ~absent
    report.absences = int((absent & good_position & (classes >= 0)).sum())
    report.unknown_records = int(((classes < 0) & good_position).sum())
    report.undated = int((keep & (bins < 0)).sum())
    report.used = int(keep.sum())

    # A missing or unparseable count is one record; a count c >= 1 weighs 1 + ln(c) (see the module's docstring)
    weights = np.where(np.isfinite(counts) & (counts >= 1), 1.0 + np.log(np.maximum(counts, 1.0)), 1.0)
    records = Records(
        latitudes[keep],
        longitudes[keep],
        bins[keep],
        classes[keep].astype(np.int32),
        weights[keep].astype(np.float32),
    )
    return (records, report)


def parse_column_overrides(specs: Sequence[str]) -> dict[str, str]:
    """``field=column`` strings (the command line's ``--column``) as a dict; unknown fields are refused."""
    overrides = {}
    for spec in specs:
        match = re.fullmatch(r"\s*(\w+)\s*=\s*(.+?)\s*", spec)
        if not match or match.group(1) not in COLUMN_CANDIDATES:
            raise BirderError(
                f"--column '{spec}': expected FIELD=COLUMN with FIELD one of {', '.join(COLUMN_CANDIDATES)}"
            )
        overrides[match.group(1)] = match.group(2)
    return overrides
