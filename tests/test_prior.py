"""The location-and-season prior: reading records, building, the .bpr file, lookups, birder-prior, the benchmark."""

import csv
import datetime as dt
import json
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from birder.errors import BirderError
from birder.geo import grid
from birder.geo.build import build_prior_file, class_names_of
from birder.geo.prior import MODE_NONE, MODE_PLACE, MODE_PLACE_DAY, LocationPrior, PriorSettings, out_of_range
from birder.geo.prior_file import load_prior, load_prior_for, save_prior
from birder.geo.records import Records, read_mapping_file, read_records
from birder.geo.season import DAY_BINS, day_bin_of_date, seasonal_factors
from birder.scripts.prior import main as prior_main

CLASSES = ["Parus major", "Erithacus rubecula", "Pica pica"]
GBIF_HEADER = [
    "gbifID",
    "species",
    "scientificName",
    "decimalLatitude",
    "decimalLongitude",
    "eventDate",
    "individualCount",
]
# One record of each problem, and good ones; the comment says how each must be counted
MESSY_ROWS = [
    ["1", "Parus major", "Parus major Linnaeus, 1758", "48.2", "16.37", "2023-05-14", "2"],  # good
    ["2", "", "Parus major Linnaeus, 1758", "48.3", "16.40", "2023-05-15T07:00:00Z", ""],  # good (scientificName)
    ["3", "Erithacus rubecula", "Erithacus rubecula", "48.2", "16.37", "2023-13-01", "1"],  # undated (month 13)
    ["4", "Parus major", "Parus major", "95", "16.37", "2023-05-14", "1"],  # impossible latitude
    ["5", "Parus major", "Parus major", "abc", "16.37", "2023-05-14", "1"],  # not a number
    ["6", "Parus major", "Parus major", "", "", "2023-05-14", "1"],  # missing position
    ["7", "Turdus merula", "Turdus merula", "48.2", "16.37", "2023-05-14", "1"],  # unknown species
    ["8", "Parus major", "Parus major", "0", "0", "2023-05-14", "1"],  # (0, 0) placeholder
    ["9", "Parus major", "Parus major", "48.2", "16.37", "2023-05-14", "0"],  # absence
    ["10", "Pica pica", "Pica pica", "48.2", "16.37", "2023-02-30", "1"],  # undated (no such day)
    ["11", "Pica pica", "Pica pica", "48.2", "-200", "2023-02-03", "1"],  # impossible longitude
    ["12", "Pica pica", "Pica pica", "48.2", "16.37", "", "1"],  # undated (missing)
]


def write_table(path: Path, header: list[str], rows: list[list[str]], delimiter: str = "\t") -> Path:
    if path.suffix == ".parquet":
        columns = {name: [row[i] or None for row in rows] for (i, name) in enumerate(header)}
        pq.write_table(pa.table({name: pa.array(values, pa.string()) for (name, values) in columns.items()}), path)
    else:
        with open(path, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle, delimiter=delimiter, lineterminator="\n").writerows([header, *rows])
    return path


def generated_records(count: int = 4000, seed: int = 0) -> Records:
    """Parus major in the north-west in summer, Pica pica in the south-east in winter, Erithacus everywhere."""
    rng = np.random.default_rng(seed)
    species = rng.choice(3, size=count, p=[0.4, 0.2, 0.4])
    centres = np.array([[55.0, 0.0], [50.0, 10.0], [45.0, 20.0]])
    spread = np.array([1.0, 6.0, 1.0])
    lat = centres[species, 0] + rng.standard_normal(count) * spread[species]
    lon = centres[species, 1] + rng.standard_normal(count) * spread[species]
    days = np.array([170, 0, 355])[species] + rng.integers(-30, 31, count)
    bins = (days % DAY_BINS).astype(np.int16)
    return Records(lat, lon, bins, species.astype(np.int32), np.ones(count, np.float32))


@pytest.fixture(scope="module")
def prior() -> LocationPrior:
    return LocationPrior.build(generated_records(), CLASSES)


# ---------------------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------------------


def test_bad_records_counted_in_one_line_each_and_the_rest_used(tmp_path: Path) -> None:
    (records, report) = read_records(write_table(tmp_path / "gbif.csv", GBIF_HEADER, MESSY_ROWS), CLASSES)
    assert (report.read, report.used) == (12, 5)
    assert report.bad_position == 5  # 95, abc, empty, (0, 0), -200
    assert report.unknown_records == 1 and report.unknown_names == ["Turdus merula"]
    assert report.absences == 1
    assert report.undated == 3  # month 13, 30 February, empty: kept for the place
    lines = report.lines()
    assert len(lines) == 5 and all("\n" not in line for line in lines)
    assert any("5 records without a usable position" in line for line in lines)
    assert any("'Turdus merula'" in line and "--mapping" in line for line in lines)
    assert any("3 records with a missing or unparseable date" in line for line in lines)
    assert any("1 absence records" in line for line in lines)
    assert sorted(records.classes.tolist()) == [0, 0, 1, 2, 2]
    assert (records.day_bins >= 0).sum() == 2
    # A count of 2 weighs 1 + ln 2; a missing count weighs 1
    assert sorted(records.weights.tolist())[-1] == pytest.approx(1 + np.log(2))


def test_tab_comma_and_parquet_files_read_alike(tmp_path: Path) -> None:
    tab = read_records(write_table(tmp_path / "a.csv", GBIF_HEADER, MESSY_ROWS), CLASSES)[0]
    comma = read_records(write_table(tmp_path / "b.csv", GBIF_HEADER, MESSY_ROWS, delimiter=","), CLASSES)[0]
    parquet = read_records(write_table(tmp_path / "c.parquet", GBIF_HEADER, MESSY_ROWS), CLASSES)[0]
    with open(tmp_path / "d.tsv", "w", newline="", encoding="utf-8") as handle:  # quoted, as pyarrow writes them
        csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_ALL).writerows([GBIF_HEADER, *MESSY_ROWS])
    quoted = read_records(tmp_path / "d.tsv", CLASSES)[0]
    for other in (comma, parquet, quoted):
        for name in ("latitudes", "longitudes", "day_bins", "classes", "weights"):
            np.testing.assert_array_equal(getattr(tab, name), getattr(other, name))


def test_mapping_file_and_plain_column_names(tmp_path: Path) -> None:
    rows = [["Great Tit", "48.2", "16.4", "2023-05-14"], ["great_tit", "48.2", "16.4", "2023-05-14"]]
    rows.append(["Magpie", "48.2", "16.4", "2023-05-14"])
    path = write_table(tmp_path / "plain.csv", ["name", "latitude", "longitude", "date"], rows, delimiter=",")
    mapping = tmp_path / "mapping.csv"
    mapping.write_text("record name,class name\nGreat Tit,Parus major\n", encoding="utf-8")
    (records, report) = read_records(path, CLASSES, mapping=read_mapping_file(mapping, CLASSES))
    assert records.classes.tolist() == [0, 0] and report.unknown_names == ["Magpie"]

    mapping.write_text("Great Tit,Parus maximus\n", encoding="utf-8")
    mapping.write_text("a,b\nGreat Tit,Parus maximus\n", encoding="utf-8")
    with pytest.raises(BirderError, match="'Parus maximus' is not a class"):
        read_mapping_file(mapping, CLASSES)


def test_missing_required_column_refused_in_one_line(tmp_path: Path) -> None:
    path = write_table(tmp_path / "r.csv", ["species", "lat"], [["Pica pica", "1"]], delimiter=",")
    with pytest.raises(BirderError, match="no longitude column") as info:
        read_records(path, CLASSES)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------------
# Grid and season
# ---------------------------------------------------------------------------------------------------------------------


def test_parent_cells_from_index_bits_match_h3() -> None:
    h3 = grid.import_h3()
    rng = np.random.default_rng(0)
    (lat, lon) = (rng.uniform(-80, 80, 300), rng.uniform(-180, 180, 300))
    cells = grid.cells_of_points(lat, lon, 6)
    for resolution in (0, 2, 5):
        expected = [h3.cell_to_parent(int(cell), resolution) for cell in cells]
        assert grid.parent_cells(cells, resolution).tolist() == expected
    assert cells.tolist() == [h3.latlng_to_cell(a, b, 6) for (a, b) in zip(lat, lon, strict=True)]


def test_season_wraps_around_the_new_year() -> None:
    counts = np.zeros((1, DAY_BINS))
    counts[0, DAY_BINS - 1] = 50  # 31 December
    factors = seasonal_factors(counts, width_days=10, pseudo_count=1)[0]
    assert factors[0] > 10 * factors[182]  # 1 January is next to it, midsummer is not
    assert factors.mean() == pytest.approx(1.0, rel=1e-5)
    assert factors.min() > 0
    assert day_bin_of_date(dt.date(2023, 12, 31)) == DAY_BINS - 1 and day_bin_of_date(dt.date(2024, 12, 31)) == 364


# ---------------------------------------------------------------------------------------------------------------------
# The prior
# ---------------------------------------------------------------------------------------------------------------------


def test_place_and_season_pick_the_species_and_floor_keeps_every_one(prior: LocationPrior) -> None:
    summer = prior.lookup((55.0, 0.0), "2023-06-20")
    winter = prior.lookup((45.0, 20.0), dt.datetime(2023, 12, 20, 7, 30))
    assert summer.mode == winter.mode == MODE_PLACE_DAY
    assert np.argmax(summer.vector) == 0 and np.argmax(winter.vector) == 2
    assert summer.vector[2] < 0.01 and summer.vector.min() >= prior.settings.floor / 3
    assert summer.vector.sum() == pytest.approx(1.0, abs=1e-5)
    # Season: Parus major's place in winter is less sure of it than in summer
    assert prior.lookup((55.0, 0.0), "2023-12-20").vector[0] < summer.vector[0]
    assert out_of_range(np.array([0.1, 0.1, 0.8]), summer.vector) is True
    assert out_of_range(np.array([0.8, 0.1, 0.1]), summer.vector) is False


def test_modes_place_only_and_image_only(prior: LocationPrior) -> None:
    year_round = prior.lookup((55.0, 0.0), None)
    assert year_round.mode == MODE_PLACE and np.argmax(year_round.vector) == 0
    assert prior.lookup((55.0, 0.0), "2023-05").mode == MODE_PLACE  # a month is no day
    for location in (None, (None, None), (95.0, 0.0), (float("nan"), 3.0)):
        answer = prior.lookup(location, "2023-06-20")
        assert answer.mode == MODE_NONE and answer.vector is None
    assert out_of_range(np.array([0.5, 0.5, 0.0]), None) is None


def test_thin_cells_back_off_to_coarser_ones() -> None:
    records = generated_records()
    # One Pica pica record deep in Parus major's range: its fine cell must not declare Pica pica the local species
    lonely = Records(
        np.r_[records.latitudes, 55.0],
        np.r_[records.longitudes, 0.0],
        np.r_[records.day_bins, 170].astype(np.int16),
        np.r_[records.classes, 2].astype(np.int32),
        np.ones(len(records) + 1, np.float32),
    )
    vector = LocationPrior.build(lonely, CLASSES).lookup((55.0, 0.0), None).vector
    assert np.argmax(vector) == 0 and vector[2] < 0.3


def test_file_round_trip_small_and_refused_for_other_classes(prior: LocationPrior, tmp_path: Path) -> None:
    path = save_prior(prior, tmp_path / "p.bpr")
    loaded = load_prior_for(path, CLASSES)
    for place, day in (((55.0, 0.0), "2023-06-20"), ((47.0, 12.0), None)):
        np.testing.assert_allclose(loaded.lookup(place, day).vector, prior.lookup(place, day).vector, rtol=1e-6)
    assert path.stat().st_size < 100_000
    with zipfile.ZipFile(path) as archive:  # the documented layout
        metadata = json.loads(archive.read("metadata.json"))
        assert metadata["format"] == "birder-prior" and metadata["classes"] == CLASSES
        assert {"global_counts.npy", "day_counts.npy", "r5_cells.npy", "r2_counts.npy"} <= set(archive.namelist())

    with pytest.raises(BirderError, match="built for another model's classes") as info:
        load_prior_for(path, [*CLASSES, "Corvus corax"])
    assert "birder-prior build --classes" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(BirderError, match="another model's classes"):
        load_prior_for(path, list(reversed(CLASSES)))  # same names, other order: another model
    (tmp_path / "junk.bpr").write_bytes(b"not a zip")
    with pytest.raises(BirderError, match="not a readable prior file"):
        load_prior(tmp_path / "junk.bpr")


def test_settings_validated() -> None:
    with pytest.raises(BirderError, match="resolutions"):
        PriorSettings(resolutions=(3, 16))
    with pytest.raises(BirderError, match="floor"):
        PriorSettings(floor=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# birder-prior
# ---------------------------------------------------------------------------------------------------------------------


def test_cli_build_from_model_file_then_info_and_lookup(tmp_path: Path, capsys) -> None:
    from test_predict import CLASSES as MODEL_CLASSES
    from test_predict import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny.pt")
    rows = [[name, "48.2", "16.4", "2023-05-14"] for name in MODEL_CLASSES] + [["Nobody", "48.2", "16.4", "x"]]
    records = write_table(
        tmp_path / "r.csv", ["scientificName", "decimalLatitude", "decimalLongitude", "eventDate"], rows, ","
    )
    assert class_names_of(model) == MODEL_CLASSES
    assert prior_main(["build", str(records), "--classes", str(model), "-o", str(tmp_path / "p.bpr")]) == 0
    out = capsys.readouterr().out
    assert "5 of 6 records used" in out and "'Nobody'" in out and "wrote" in out
    assert load_prior(tmp_path / "p.bpr").classes == MODEL_CLASSES

    assert prior_main(["info", str(tmp_path / "p.bpr")]) == 0
    assert json.loads(capsys.readouterr().out)["classes"] == len(MODEL_CLASSES)
    assert (
        prior_main(["lookup", str(tmp_path / "p.bpr"), "--lat", "48.2", "--lon", "16.4", "--date", "2024-05-14"]) == 0
    )
    assert "place_day" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "classes.txt").write_text("Pica pica\n")
    empty = write_table(tmp_path / "r.csv", ["species", "lat", "lon"], [["Nobody", "1", "2"]], ",")
    for argv, expected in (
        (["build", str(empty), "--classes", str(tmp_path / "classes.txt"), "-o", "p.bpr"], "no usable records"),
        (["build", str(empty), "--classes", "missing.pt", "-o", "p.bpr"], "no such model file"),
        (["info", "missing.bpr"], "does not exist"),
    ):
        assert prior_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and "\n" not in err and "Traceback" not in err
    assert not Path("p.bpr").exists()


def test_build_report_lists_every_problem(tmp_path: Path) -> None:
    report = build_prior_file(write_table(tmp_path / "g.csv", GBIF_HEADER, MESSY_ROWS), CLASSES, tmp_path / "p.bpr")
    assert report.records.used == 5 and report.file_bytes == (tmp_path / "p.bpr").stat().st_size
    assert load_prior(tmp_path / "p.bpr").info["records_report"]["bad_position"] == 5


# ---------------------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------------------


def test_benchmark_tiny_runs(tmp_path: Path) -> None:
    from benchmarks import prior as benchmark

    assert benchmark.main(["--tiny", "--output", str(tmp_path / "prior.json")]) == 0
    report = json.loads((tmp_path / "prior.json").read_text())
    accuracy = report["accuracy"]
    assert accuracy["records"] == 5_000 and 0.5 < accuracy["image_only_top1"] < 0.7
    assert {"true_place_and_day", "shifted_50km_15days", "uniform_place"} <= set(accuracy)


def test_benchmark_world_places_kilometres_on_the_globe() -> None:
    from benchmarks import prior as benchmark

    def km_between(lat1, lon1, lat2, lon2):  # haversine
        (p1, p2, dl) = (np.radians(lat1), np.radians(lat2), np.radians(lon2 - lon1))
        h = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
        return 2 * benchmark.EARTH_RADIUS_KM * np.arcsin(np.sqrt(h))

    (lat, lon) = benchmark.to_lat_lon(np.array([0.0, 0.0, 1500.0, 1000.0]), np.array([0.0, 1500.0, 0.0, -1000.0]))
    assert (lat[0], lon[0]) == pytest.approx(benchmark.CENTRE)
    assert lat[1] == pytest.approx(50.0 + 1500 / 111.195, abs=0.01) and lon[1] == pytest.approx(10.0)  # north
    distances = km_between(benchmark.CENTRE[0], benchmark.CENTRE[1], lat, lon)
    np.testing.assert_allclose(distances, [0.0, 1500.0, 1500.0, 1000.0 * np.sqrt(2)], atol=1e-6)
    # GPS errors: 50 km in any direction is 50 km on the ground
    (moved_lat, moved_lon) = benchmark.destination(lat, lon, np.array([0.3, 1.9, 3.5, 5.1]), benchmark.SHIFT_KM)
    np.testing.assert_allclose(km_between(lat, lon, moved_lat, moved_lon), benchmark.SHIFT_KM, rtol=1e-9)


def test_benchmark_targets(tmp_path: Path) -> None:
    # About 5 s: the fixed world, 100,000 records, 5,000 photos (the 1 M / 5 M record builds are not part of it)
    from benchmarks import prior as benchmark

    assert benchmark.main(["--skip-scale", "--skip-gain", "--output", str(tmp_path / "prior.json")]) == 0
    report = json.loads((tmp_path / "prior.json").read_text())
    assert all(report["targets"].values()), report["targets"]
