"""Where, when and how strongly: the geo inputs a user types (issue 26), each answered right or refused in one line.

A model of three classes (fewer than the default ``--top-k 5``), the camera folders of ``test_geo_export`` and a
prior that knows one species around camera A.
"""

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_vit
from test_geo_export import CAMERA_A, make_camera_folders
from test_predict import MODEL_SIZE, RGB_STATS

import birder
from birder.errors import BirderError
from birder.geo.places import PlaceResolver, read_locations_file
from birder.geo.predict import GeoOptions, PhotoPrior, check_geo_options
from birder.geo.prior import LocationPrior
from birder.geo.prior_file import load_prior, save_prior
from birder.geo.records import Records
from birder.inference.decision import apply_prior
from birder.io.journal import JOURNAL_DIR, JournalSet
from birder.io.table_files import TableSpec, string_columns
from birder.scripts.predict import main as predict_main
from birder.scripts.prior import main as prior_main

THREE = ["Species A", "Species B", "Species C"]
PRESENT = "Species B"  # the one species the prior knows around camera A


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("geo-inputs")
    net = make_tiny_vit(num_classes=len(THREE), size=MODEL_SIZE)
    info = birder.ModelInfo({name: i for (i, name) in enumerate(THREE)}, None, RGB_STATS)
    rng = np.random.default_rng(0)
    count = 300
    records = Records(
        CAMERA_A[0] + rng.standard_normal(count) * 0.5,
        CAMERA_A[1] + rng.standard_normal(count) * 0.5,
        rng.integers(100, 200, count).astype(np.int16),
        np.full(count, THREE.index(PRESENT), np.int32),
        np.ones(count, np.float32),
    )
    return {
        "model": birder.save_model(net, tmp / "three.pt", info),
        "photos": make_camera_folders(tmp / "photos"),
        "prior": save_prior(LocationPrior.build(records, THREE), tmp / "three.bpr"),
    }


def predict(world: dict[str, Path], out: Path, *extra: str) -> int:
    args = ["--weights", str(world["model"]), str(world["photos"]), "--output-dir", str(out), "-j", "0"]
    return predict_main([*args, "--no-progress", *extra])


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def last_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------------------------------
# --top-k larger than the classes, with --prior (and a failed run's journals)
# ---------------------------------------------------------------------------------------------------------------------


def test_prior_with_fewer_classes_than_the_top_k(world: dict[str, Path], tmp_path: Path) -> None:
    assert predict(world, tmp_path / "plain") == 0
    # The default --top-k 5 with three classes, the prior's image-only columns and the events table included
    assert predict(world, tmp_path / "prior", "--prior", str(world["prior"]), "--events") == 0
    plain = {row["path"]: row for row in read_csv(tmp_path / "plain" / "results.csv")}
    rows = read_csv(tmp_path / "prior" / "results.csv")
    assert len(rows) == 5
    assert "top3_class" in rows[0] and "top4_class" not in rows[0]
    assert "image_top3_class" in rows[0] and "image_top4_class" not in rows[0]
    for row in rows:
        for rank in (1, 2, 3):  # the image-only answer is the plain run's, every class of it
            assert row[f"image_top{rank}_class"] == plain[row["path"]][f"top{rank}_class"]
            assert row[f"image_top{rank}_prob"] == plain[row["path"]][f"top{rank}_prob"]
        if row["path"].endswith(("camA/0001.jpg", "camA/0003.jpg")):
            assert row["prior"] == "place_day" and row["prediction"] == PRESENT
    events = read_csv(tmp_path / "prior" / "events.csv")
    assert len(events) == 4 and "image_top3_class" in events[0] and "top4_class" not in events[0]

    # A regional list of two classes: two of each
    species = tmp_path / "species.txt"
    species.write_text("Species A\nSpecies C\n", encoding="utf-8")
    assert predict(world, tmp_path / "two", "--prior", str(world["prior"]), "--species", str(species)) == 0
    row = read_csv(tmp_path / "two" / "results.csv")[0]
    assert "image_top2_class" in row and "image_top3_class" not in row and "top3_class" not in row
    assert {row["image_top1_class"], row["image_top2_class"]} == {"Species A", "Species C"}


def test_a_run_failing_before_any_row_leaves_no_partial_folder(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import birder.runs.predict

    def broken(*args, **kwargs):
        raise RuntimeError("the model broke")

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(birder.runs.predict, "classified_rows", broken)
        with pytest.raises(RuntimeError, match="the model broke"):
            predict(world, out, "--prior", str(world["prior"]))
    assert not (out / JOURNAL_DIR).exists()  # nothing was done: nothing to resume, nothing stale
    assert predict(world, out, "--prior", str(world["prior"]), "--resume") == 0
    assert len(read_csv(out / "results.csv")) == 5 and not (out / JOURNAL_DIR).exists()


def test_journals_with_committed_rows_stay_after_a_failure(tmp_path: Path) -> None:
    spec = TableSpec("results", string_columns("path", "prediction"), marks_done=True)
    with pytest.raises(RuntimeError), JournalSet(tmp_path, [spec], 0, 0, chunk_size=1) as journals:
        journals.add({"results": [["a.jpg", "Species A"]]}, 1)  # a full chunk: committed
        raise RuntimeError("interrupted later")
    journal = tmp_path / JOURNAL_DIR / "results.r0.a0.csv"
    assert journal.read_text(encoding="utf-8").splitlines() == ["path,prediction", "a.jpg,Species A"]


# ---------------------------------------------------------------------------------------------------------------------
# --prior-strength
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", ["nan", "inf", "-inf", "-1", "strong"])
def test_prior_strength_must_be_a_finite_number_at_least_zero(
    world: dict[str, Path], tmp_path: Path, strength: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        predict(world, tmp_path / "out", "--prior", str(world["prior"]), f"--prior-strength={strength}")
    assert exit_info.value.code == 2
    line = last_error_line(capsys)
    assert "--prior-strength" in line and "finite number >= 0" in line and strength in line
    assert not (tmp_path / "out").exists()


def test_library_refuses_a_prior_strength_that_is_no_finite_number(world: dict[str, Path]) -> None:
    probabilities = np.array([[0.6, 0.3, 0.1]])
    prior = np.array([0.1, 0.8, 0.1])
    for strength in (float("nan"), float("inf"), -0.5):
        with pytest.raises(BirderError, match="must be a finite number >= 0"):
            apply_prior(probabilities, prior, strength)
        with pytest.raises(BirderError, match="--prior-strength must be a finite number >= 0"):
            PhotoPrior(load_prior(world["prior"]), strength, PlaceResolver(), None, 5)
        with pytest.raises(BirderError, match="--prior-strength"):
            check_geo_options(GeoOptions(prior=world["prior"], prior_strength=strength))
    assert apply_prior(probabilities, prior, 2.0)[0].argmax() == 1  # a finite strength still works


# ---------------------------------------------------------------------------------------------------------------------
# --locations
# ---------------------------------------------------------------------------------------------------------------------


def test_a_binary_locations_file_is_one_line(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    binary = tmp_path / "locations.csv"
    binary.write_bytes((world["photos"] / "camA" / "0001.jpg").read_bytes())  # a photo, named as a CSV
    assert predict(world, tmp_path / "out", "--prior", str(world["prior"]), "--locations", str(binary)) == 2
    line = last_error_line(capsys)
    assert line.startswith("birder-predict: error: locations file") and str(binary) in line and "UTF-8" in line
    assert not (tmp_path / "out" / "results.csv").exists()


BAD_ROWS = {
    "a.jpg,95,16.4,2024-05-01": "latitude 95 is outside -90..90",
    "a.jpg,48.2,-181,2024-05-01": "longitude -181 is outside -180..180",
    "a.jpg,abc,16.4,2024-05-01": "latitude 'abc' is not a number",
    "a.jpg,48.2,inf,2024-05-01": "longitude 'inf' is not a number",
    "a.jpg,nan,16.4,2024-05-01": "latitude 'nan' is not a number",
    "a.jpg,48.2,,2024-05-01": "no longitude for 'a.jpg'",
    "a.jpg,,16.4,": "no latitude for 'a.jpg'",
    "a.jpg,48.2,16.4,2024-13-45": "date '2024-13-45' is not a date",
    "a.jpg,48.2,16.4,2023-02-29": "date '2023-02-29' is not a date",
    ",48.2,16.4,2024-05-01": "no path",
}


@pytest.mark.parametrize("row", list(BAD_ROWS))
def test_a_bad_value_in_the_locations_file_names_file_line_and_value(tmp_path: Path, row: str) -> None:
    path = tmp_path / "locations.csv"
    path.write_text(f"path,latitude,longitude,date\ngood.jpg,48.2,16.4,2024-05-01\n{row}\n", encoding="utf-8")
    with pytest.raises(BirderError) as info:
        read_locations_file(path)
    assert str(info.value).startswith(f"locations file '{path}' line 3: {BAD_ROWS[row]}")
    assert "\n" not in str(info.value)


def test_a_bad_locations_row_stops_the_run_before_any_photo(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "locations.csv"
    path.write_text("path,latitude,longitude,date\n0001.jpg,95,16.4,2024-05-01\n", encoding="utf-8")
    assert predict(world, tmp_path / "out", "--prior", str(world["prior"]), "--locations", str(path)) == 2
    assert last_error_line(capsys) == (
        f"birder-predict: error: locations file '{path}' line 2: latitude 95 is outside -90..90"
    )
    assert not (tmp_path / "out" / "results.csv").exists()


def test_a_photo_listed_twice_must_agree(tmp_path: Path) -> None:
    path = tmp_path / "locations.csv"
    rows = ["0001.jpg,48.2,16.4,2024-05-01", "0002.jpg,47.0,15.0,", "0001.jpg,48.2,16.4,2024:05:01 10:00:00"]
    path.write_text("path,latitude,longitude,date\n" + "\n".join(rows) + "\n", encoding="utf-8")
    assert read_locations_file(path) == {"0001.jpg": ((48.2, 16.4), "2024-05-01"), "0002.jpg": ((47.0, 15.0), None)}

    path.write_text(path.read_text(encoding="utf-8") + "0001.jpg,48.3,16.4,2024-05-01\n", encoding="utf-8")
    with pytest.raises(BirderError) as info:
        read_locations_file(path)
    assert str(info.value) == (
        f"locations file '{path}' lines 2 and 5 give different positions or dates for '0001.jpg': "
        "keep one row per photo"
    )


def test_locations_of_photos_not_in_the_run_are_one_warning(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "locations.csv"
    photo = world["photos"] / "camB" / "0001.jpg"
    rows = [f"{photo},{CAMERA_A[0]},{CAMERA_A[1]},2023-06-01", "elsewhere/0009.jpg,1,2,", "0042.jpg,3,4,2024-01-01"]
    path.write_text("path,latitude,longitude,date\n" + "\n".join(rows) + "\n", encoding="utf-8")
    assert predict(world, tmp_path / "run", "--prior", str(world["prior"]), "--locations", str(path)) == 0
    out = tmp_path / "run" / "results.csv"
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"birder-predict: warning: 2 of the 3 photos in {path} are none of the 5 photos")
    assert os.path.abspath("elsewhere/0009.jpg") in warnings[0] and "0042.jpg" in warnings[0]
    priors = {Path(row["path"]).relative_to(world["photos"]).as_posix(): row["prior"] for row in read_csv(out)}
    assert priors["camB/0001.jpg"] == "place_day"  # the row that matches is used (no GPS in that photo)
    assert priors["camB/0002.jpg"] == "none"


def test_a_locations_file_with_one_coordinate_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "locations.csv"
    path.write_text("path,latitude,date\na.jpg,48.2,2024-05-01\n", encoding="utf-8")
    with pytest.raises(BirderError, match="has a latitude column but no longitude column"):
        read_locations_file(path)


# ---------------------------------------------------------------------------------------------------------------------
# birder-prior lookup --top
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top", ["0", "-3"])
def test_prior_lookup_top_must_be_a_positive_whole_number(
    world: dict[str, Path], top: str, capsys: pytest.CaptureFixture[str]
) -> None:
    lookup = ["lookup", str(world["prior"]), "--lat", "48.2", "--lon", "16.4"]
    with pytest.raises(SystemExit) as exit_info:
        prior_main([*lookup, f"--top={top}"])
    assert exit_info.value.code == 2
    line = last_error_line(capsys)
    assert "--top" in line and "at least 1" in line and top in line

    assert prior_main([*lookup, "--top", "2"]) == 0  # a positive count lists that many
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[1].split()[:2] == PRESENT.split()
