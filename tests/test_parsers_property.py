"""Property-based tests of the files users feed birder (issue 26, "keep it so"): occurrence records, the locations
CSV, taxonomies, species lists and name mappings.

For each parser: any bytes or text raise nothing but a one-line :class:`BirderError`; well-formed generated rows
read back as the values written; an impossible coordinate or date is refused naming its line (the locations file)
or counted and left out (occurrence records, where a download of millions has some by nature).

Deterministic (``derandomize``: the same examples on every run and machine) and fast (a few dozen examples each).
"""

import csv
import datetime as dt
import math
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from birder.errors import BirderError
from birder.geo.places import read_locations_file
from birder.geo.records import normalize_name, read_mapping_file, read_records
from birder.geo.season import day_bin_of_date
from birder.inference.predictor import read_species_file
from birder.inference.taxonomy import Taxonomy

PROPERTY = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)
CLASSES = ["Parus major", "Erithacus rubecula", "Pica pica", "Turdus merula"]
CSV_DEFAULT_LIMIT = 131072  # csv.field_size_limit() of a fresh Python
GBIF_HEADER = ["gbifID", "species", "decimalLatitude", "decimalLongitude", "eventDate", "individualCount"]

# Text a user's file can hold: any characters a UTF-8 file can (no lone surrogates)
any_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)
# A cell of a CSV: anything, quoted by the csv writer where it needs to be
any_cell = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
# Names as people write them: words of letters, digits and punctuation (no '#', which starts a comment in a
# species list, and no line breaks), one space between words
word = st.text(
    st.characters(categories=("L", "N", "P"), exclude_characters="#\"'", max_codepoint=0x2FFF), min_size=1, max_size=8
)
name = st.lists(word, min_size=1, max_size=3).map(" ".join)
latitude = st.floats(-90, 90, allow_nan=False)
longitude = st.floats(-180, 180, allow_nan=False)
day = st.dates(dt.date(1900, 1, 1), dt.date(2100, 12, 31))


@contextmanager
def written(content: bytes | str, suffix: str = ".csv") -> Iterator[Path]:
    """``content`` in a file of its own, removed afterwards."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"input{suffix}"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        yield path


def csv_text(rows: list[list[Any]], delimiter: str = ",") -> str:
    with tempfile.TemporaryFile("w+", newline="", encoding="utf-8") as handle:
        csv.writer(handle, delimiter=delimiter, lineterminator="\n").writerows(rows)
        handle.seek(0)
        return handle.read()


def only_one_line_errors(parse: Callable[[Path], Any], path: Path) -> Any:
    """``parse(path)``, or None when it raised a one-line BirderError; any other exception fails the test."""
    try:
        return parse(path)
    except BirderError as exc:
        message = str(exc)
        assert message and "\n" not in message and "\r" not in message, repr(message)
        return None


# ---------------------------------------------------------------------------------------------------------------------
# Anything at all: a one-line BirderError or an answer
# ---------------------------------------------------------------------------------------------------------------------

PARSERS: dict[str, Callable[[Path], Any]] = {
    "records": lambda path: read_records(path, CLASSES),
    "locations": read_locations_file,
    "taxonomy": Taxonomy.from_csv,
    "species": read_species_file,
    "mapping": lambda path: read_mapping_file(path, CLASSES),
}


@pytest.mark.parametrize("parser", list(PARSERS))
@PROPERTY
@given(content=st.binary(max_size=400))
def test_any_bytes_give_an_answer_or_one_line(parser: str, content: bytes) -> None:
    with written(content) as path:
        only_one_line_errors(PARSERS[parser], path)


@pytest.mark.parametrize("parser", list(PARSERS))
@PROPERTY
@given(content=any_text)
def test_any_text_gives_an_answer_or_one_line(parser: str, content: str) -> None:
    with written(content) as path:
        only_one_line_errors(PARSERS[parser], path)


@PROPERTY
@given(content=st.binary(max_size=400))
def test_any_bytes_named_parquet_give_an_answer_or_one_line(content: bytes) -> None:
    with written(content, ".parquet") as path:
        only_one_line_errors(PARSERS["records"], path)


@pytest.mark.parametrize(
    ("parser", "header"),
    [
        ("records", GBIF_HEADER),
        ("locations", ["path", "latitude", "longitude", "date"]),
        ("taxonomy", ["species", "genus", "family", "order"]),
    ],
)
@PROPERTY
@given(cells=st.lists(st.lists(any_cell, max_size=8), max_size=6), delimiter=st.sampled_from([",", "\t"]))
def test_the_right_header_and_any_cells_give_an_answer_or_one_line(
    parser: str, header: list[str], cells: list[list[str]], delimiter: str
) -> None:
    with written(csv_text([header, *cells], delimiter)) as path:
        only_one_line_errors(PARSERS[parser], path)


@pytest.mark.parametrize(
    ("parser", "header"),
    [
        ("records", "species,latitude,longitude"),
        ("locations", "path,latitude,longitude"),
        ("taxonomy", "species,genus,family,order"),
        ("species", "Parus major"),
        ("mapping", "record name,class name"),
    ],
)
def test_a_cell_longer_than_the_csv_modules_limit_is_one_line(parser: str, header: str) -> None:
    # The module's own limit: importing frictionless (the Camtrap DP tests do) raises it for the whole process to
    # 2**31 - 2, which made this cell 2 GB and each case two minutes of the suite
    earlier = csv.field_size_limit(CSV_DEFAULT_LIMIT)
    try:
        huge = "x" * (CSV_DEFAULT_LIMIT + 10)
        with written(f'{header}\n"{huge}",1,2,3\n') as path:
            only_one_line_errors(PARSERS[parser], path)
    finally:
        csv.field_size_limit(earlier)


# ---------------------------------------------------------------------------------------------------------------------
# Occurrence records: well-formed rows read back; impossible ones counted and left out
# ---------------------------------------------------------------------------------------------------------------------

record = st.tuples(
    st.sampled_from(range(len(CLASSES))),
    latitude,
    longitude,
    day,
    st.integers(1, 10_000),
).filter(lambda r: (r[1], r[2]) != (0.0, 0.0))  # (0, 0) is the placeholder of an unknown position


def write_records(path: Path, rows: list[list[str]], delimiter: str) -> Path:
    if path.suffix == ".parquet":
        columns = {column: [row[i] or None for row in rows] for (i, column) in enumerate(GBIF_HEADER)}
        pq.write_table(pa.table({key: pa.array(values, pa.string()) for (key, values) in columns.items()}), path)
    else:
        path.write_text(csv_text([GBIF_HEADER, *rows], delimiter), encoding="utf-8")
    return path


@PROPERTY
@given(records=st.lists(record, min_size=1, max_size=20), form=st.sampled_from(["csv", "tsv", "parquet"]))
def test_well_formed_records_read_back_as_written(records: list[tuple[Any, ...]], form: str) -> None:
    rows = [
        [str(i), CLASSES[c], repr(lat), repr(lon), d.isoformat(), str(n)]
        for (i, (c, lat, lon, d, n)) in enumerate(records)
    ]
    with tempfile.TemporaryDirectory() as folder:
        path = write_records(Path(folder) / f"r.{form}", rows, "\t" if form == "tsv" else ",")
        (read, report) = read_records(path, CLASSES)
    assert (report.read, report.used, report.bad_position, report.undated) == (len(rows), len(rows), 0, 0)
    np.testing.assert_array_equal(read.latitudes, [r[1] for r in records])
    np.testing.assert_array_equal(read.longitudes, [r[2] for r in records])
    np.testing.assert_array_equal(read.classes, [r[0] for r in records])
    np.testing.assert_array_equal(read.day_bins, [day_bin_of_date(r[3]) for r in records])
    np.testing.assert_allclose(read.weights, [1 + math.log(r[4]) for r in records], rtol=1e-6)


bad_latitude = st.one_of(
    st.floats(90, 1e6, exclude_min=True).map(repr),
    st.floats(-1e6, -90, exclude_max=True).map(repr),
    st.sampled_from(["", "abc", "nan", "inf", "48,2", "N48.2", "--1"]),
)
bad_longitude = st.one_of(
    st.floats(180, 1e6, exclude_min=True).map(repr),
    st.floats(-1e6, -180, exclude_max=True).map(repr),
    st.sampled_from(["", "east", "-inf", "16.4.1"]),
)
bad_date = st.sampled_from(["2023-13-01", "2023-02-30", "2024-00-10", "14/05/2023", "May 2023", "2023", "x"])


@PROPERTY
@given(
    records=st.lists(record, min_size=2, max_size=12),
    bad=st.data(),
    form=st.sampled_from(["csv", "tsv", "parquet"]),
)
def test_impossible_positions_and_dates_are_counted_and_left_out(
    records: list[tuple[Any, ...]], bad: st.DataObject, form: str
) -> None:
    rows = [
        [str(i), CLASSES[c], repr(la), repr(lo), d.isoformat(), str(n)] for (i, (c, la, lo, d, n)) in enumerate(records)
    ]
    no_position = bad.draw(st.sets(st.integers(0, len(rows) - 1), max_size=len(rows)))
    no_date = bad.draw(st.sets(st.integers(0, len(rows) - 1), max_size=len(rows)))
    for index in no_position:
        if bad.draw(st.booleans()):
            rows[index][2] = bad.draw(bad_latitude)
        else:
            rows[index][3] = bad.draw(bad_longitude)
    for index in no_date:
        rows[index][4] = bad.draw(bad_date)
    with tempfile.TemporaryDirectory() as folder:
        path = write_records(Path(folder) / f"r.{form}", rows, "\t" if form == "tsv" else ",")
        (read, report) = read_records(path, CLASSES)

    kept = [i for i in range(len(rows)) if i not in no_position]
    assert report.bad_position == len(no_position) and report.used == len(kept)
    assert report.undated == len([i for i in kept if i in no_date])
    np.testing.assert_array_equal(read.latitudes, [records[i][1] for i in kept])
    np.testing.assert_array_equal(read.day_bins, [-1 if i in no_date else day_bin_of_date(records[i][3]) for i in kept])


# ---------------------------------------------------------------------------------------------------------------------
# The locations file: well-formed rows read back; a bad value is refused naming its line
# ---------------------------------------------------------------------------------------------------------------------

photo_name = st.text(
    st.characters(categories=("L", "N"), include_characters=" ,\"'._-()#", max_codepoint=0x2FFF),
    min_size=1,
    max_size=12,
).map(lambda text: text.strip() + ".jpg")
place = st.tuples(st.one_of(st.none(), st.tuples(latitude, longitude)), st.one_of(st.none(), day))


@PROPERTY
@given(places=st.dictionaries(photo_name, place, min_size=1, max_size=15))
def test_well_formed_locations_read_back_as_written(places: dict[str, tuple[Any, Any]]) -> None:
    rows = [["path", "latitude", "longitude", "date"]]
    for photo, (position, date) in places.items():
        (lat, lon) = (repr(position[0]), repr(position[1])) if position is not None else ("", "")
        rows.append([photo, lat, lon, date.isoformat() if date is not None else ""])
    with written(csv_text(rows)) as path:
        read = read_locations_file(path)
    assert read == {
        photo: (position, date.isoformat() if date else None) for (photo, (position, date)) in places.items()
    }


@PROPERTY
@given(
    places=st.lists(st.tuples(photo_name, latitude, longitude, day), min_size=1, max_size=10, unique_by=lambda p: p[0]),
    bad=st.data(),
)
def test_a_bad_coordinate_or_date_in_the_locations_file_names_its_line(
    places: list[tuple[str, float, float, dt.date]], bad: st.DataObject
) -> None:
    rows = [["path", "latitude", "longitude", "date"]]
    rows += [[photo, repr(lat), repr(lon), date.isoformat()] for (photo, lat, lon, date) in places]
    index = bad.draw(st.integers(1, len(places)))
    (column, value) = bad.draw(
        st.one_of(
            bad_latitude.filter(bool).map(lambda v: (1, v)),
            bad_longitude.filter(bool).map(lambda v: (2, v)),
            bad_date.map(lambda v: (3, v)),
        )
    )
    rows[index][column] = value
    with written(csv_text(rows)) as path, pytest.raises(BirderError) as info:
        read_locations_file(path)
    message = str(info.value)
    assert message.startswith(f"locations file '{path}' line {index + 1}: ") and value in message
    assert ("latitude", "longitude", "date")[column - 1] in message


# ---------------------------------------------------------------------------------------------------------------------
# Taxonomy, species list, mapping: well-formed files read back
# ---------------------------------------------------------------------------------------------------------------------


@PROPERTY
@given(lineage=st.dictionaries(name, st.tuples(name, name, name), min_size=1, max_size=12))
def test_well_formed_taxonomy_reads_back_as_written(lineage: dict[str, tuple[str, str, str]]) -> None:
    rows = [["species", "genus", "family", "order"], *([species, *ranks] for (species, ranks) in lineage.items())]
    with written(csv_text(rows)) as path:
        assert Taxonomy.from_csv(path).lineage == lineage


@PROPERTY
@given(
    lineage=st.lists(st.tuples(name, name, name, name), min_size=1, max_size=8, unique_by=lambda r: r[0]), bad=st.data()
)
def test_a_taxonomy_row_with_an_empty_rank_names_its_line(lineage: list[tuple[str, ...]], bad: st.DataObject) -> None:
    rows = [["species", "genus", "family", "order"], *(list(row) for row in lineage)]
    index = bad.draw(st.integers(1, len(lineage)))
    rows[index][bad.draw(st.integers(1, 3))] = bad.draw(st.sampled_from(["", " ", "\t"]))
    with written(csv_text(rows)) as path, pytest.raises(BirderError) as info:
        Taxonomy.from_csv(path)
    assert str(info.value).startswith(f"{path}:{index + 1}: expected species,genus,family,order")


@PROPERTY
@given(
    names=st.lists(name, min_size=1, max_size=20, unique=True),
    comments=st.lists(st.sampled_from(["", "# a comment", "   "]), max_size=5),
    line_end=st.sampled_from(["\n", "\r\n"]),
)
def test_a_species_list_reads_back_as_written(names: list[str], comments: list[str], line_end: str) -> None:
    lines = [*comments, *(f"{n}  # seen 2024" if i % 2 else n for (i, n) in enumerate(names))]
    with written(line_end.join(lines) + line_end) as path:
        assert read_species_file(path) == names


@PROPERTY
@given(mapping=st.dictionaries(name, st.sampled_from(CLASSES), min_size=1, max_size=12))
def test_a_mapping_file_reads_back_as_written(mapping: dict[str, str]) -> None:
    rows = [["record name", "class name"], *([source, target] for (source, target) in mapping.items())]
    with written(csv_text(rows)) as path:
        read = read_mapping_file(path, CLASSES)
    # Names are compared without case and spacing: the last of two spellings of one name wins, as in a dict
    assert read == {normalize_name(source): target for (source, target) in mapping.items()}
