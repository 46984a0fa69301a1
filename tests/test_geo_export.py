"""Camera-trap exports (Camtrap DP 1.0.2, COCO Camera Traps) of a results folder, validated against the shipped
schemas with frictionless and JSON Schema (no network)."""

import csv
import datetime as dt
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from test_predict import random_photo, save_tiny_model

from birder.errors import BirderError
from birder.geo.camtrap import CamtrapOptions, export_camtrap_dp, parse_timezone, table_columns
from birder.geo.coco import export_coco_ct
from birder.geo.export import export_results
from birder.geo.results import read_results_folder
from birder.geo.validate import validate_camtrap_dp, validate_coco_ct
from birder.scripts.predict import main as predict_main
from birder.tools.cli import main as tools_main

START = dt.datetime(2023, 5, 14, 7, 0, 0)
CAMERA_A = (48.2082, 16.3738)  # Vienna


def camera_exif(taken: dt.datetime | None, position: tuple[float, float] | None) -> Image.Exif:
    exif = Image.Exif()
    if taken is not None:
        exif.get_ifd(0x8769)[0x9003] = taken.strftime("%Y:%m:%d %H:%M:%S")
    if position is not None:
        gps = exif.get_ifd(0x8825)
        (lat, lon) = position
        gps.update({1: "N", 2: (abs(lat), 0.0, 0.0), 3: "E", 4: (abs(lon), 0.0, 0.0)})
    return exif


def make_camera_folders(root: Path) -> Path:
    """camA: two bursts with GPS; camB: no GPS, one timed photo and one without EXIF time."""
    shots = {
        "camA/0001.jpg": (START, CAMERA_A),
        "camA/0002.jpg": (START + dt.timedelta(seconds=30), CAMERA_A),
        "camA/0003.jpg": (START + dt.timedelta(hours=2), CAMERA_A),
        "camB/0001.jpg": (START + dt.timedelta(days=1), None),
        "camB/0002.jpg": (None, None),
    }
    for seed, (name, (taken, position)) in enumerate(shots.items()):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        random_photo(seed).save(root / name, exif=camera_exif(taken, position))
    return root


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("export")
    model = save_tiny_model(tmp / "tiny.pt")
    photos = make_camera_folders(tmp / "photos")
    out = tmp / "results"
    assert (
        predict_main(["--weights", str(model), str(photos), "--output-dir", str(out), "-j", "0", "--no-progress"]) == 0
    )
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_camtrap_dp_from_results_folder_validates(results_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "export"
    argv = [
        "export",
        str(results_dir),
        "--export",
        "camtrap-dp",
        "--timezone",
        "Europe/Vienna",
        "--output-dir",
        str(out),
    ]
    assert tools_main([*argv, "--deployment-lat", "47.07", "--deployment-lon", "15.44"]) == 0
    printed = capsys.readouterr().out
    assert "1 photos without an EXIF time left out" in printed

    package_dir = out / "camtrap-dp"
    assert validate_camtrap_dp(package_dir) == []
    package = json.loads((package_dir / "datapackage.json").read_text())
    assert [r["name"] for r in package["resources"]] == ["deployments", "media", "observations"]
    assert package["resources"][0]["schema"].endswith("/1.0.2/deployments-table-schema.json")
    assert package["temporal"] == {"start": "2023-05-14", "end": "2023-05-15"}

    deployments = {row["deploymentID"]: row for row in read_csv(package_dir / "deployments.csv")}
    assert set(deployments) == {"camA", "camB"}
    assert float(deployments["camA"]["latitude"]) == pytest.approx(CAMERA_A[0], abs=1e-6)  # from the photos' GPS
    assert (deployments["camB"]["latitude"], deployments["camB"]["longitude"]) == ("47.07", "15.44")  # the options
    assert deployments["camA"]["deploymentStart"] == "2023-05-14T07:00:00+02:00"  # summer time in Vienna

    media = read_csv(package_dir / "media.csv")
    assert list(media[0]) == table_columns("media")  # every column, in the standard's order
    assert [row["filePath"] for row in media] == ["camA/0001.jpg", "camA/0002.jpg", "camA/0003.jpg", "camB/0001.jpg"]
    observations = read_csv(package_dir / "observations.csv")
    assert {row["observationLevel"] for row in observations} == {"media"}
    assert all(row["classificationMethod"] == "machine" and row["classifiedBy"] == "tiny.pt" for row in observations)
    assert {row["scientificName"] for row in observations} <= {t["scientificName"] for t in package["taxonomic"]}


def test_photos_whose_paths_camtrap_dp_cannot_hold_are_left_out_and_named(tmp_path: Path, capsys) -> None:
    """The media table's filePath may hold no '..', no line break and no leading '.', '/' or '~': such photos are
    left out (said in one line) and the package stays valid; every other odd name goes in as it is."""
    model = save_tiny_model(tmp_path / "tiny.pt")
    photos = tmp_path / "photos"
    names = [
        "camA/IMG..0001.jpg",
        "camA/new\nline.jpg",
        "~old/0001.jpg",
        'camA/Ästchen, "alt" #1 50%.jpg',
        "camA/semi;colon\ttab.jpg",
        "鳥/0001.jpg",
    ]
    for seed, name in enumerate(names):
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        random_photo(seed).save(photos / name, format="JPEG", exif=camera_exif(START, CAMERA_A))
    results = tmp_path / "results"
    argv = ["--weights", str(model), str(photos), "--output-dir", str(results), "-j", "0", "--no-progress"]
    assert predict_main(argv) == 0
    capsys.readouterr()
    out = tmp_path / "export"
    argv = ["export", str(results), "--export", "camtrap-dp", "--timezone", "+01:00", "--output-dir", str(out)]
    assert tools_main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 photos left out of the Camtrap DP export: a media filePath may not hold '..'" in printed
    assert validate_camtrap_dp(out / "camtrap-dp") == []
    media = read_csv(out / "camtrap-dp" / "media.csv")
    assert sorted(row["filePath"] for row in media) == sorted(names[3:])


def test_validator_catches_a_broken_package(results_dir: Path, tmp_path: Path) -> None:
    export_results(results_dir, ["camtrap-dp"], CamtrapOptions("+02:00", 47.0, 15.0), tmp_path)
    package_dir = tmp_path / "camtrap-dp"
    media = (package_dir / "media.csv").read_text()
    (package_dir / "media.csv").write_text(
        media.replace("+02:00", "", 1).replace("timestamp,filePath", "filePath,timestamp")
    )
    errors = validate_camtrap_dp(package_dir)
    assert any("does not match the field name" in error for error in errors)

    shutil.rmtree(package_dir)
    export_results(results_dir, ["camtrap-dp"], CamtrapOptions("+02:00", 47.0, 15.0), tmp_path)
    deployments = (package_dir / "deployments.csv").read_text()
    (package_dir / "deployments.csv").write_text(deployments.replace("camB,camB", "camZ,camB"))
    assert any("foreign key" in error for error in validate_camtrap_dp(package_dir))


def test_camtrap_dp_refusals_are_one_line(results_dir: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(BirderError, match="--timezone"):
        export_results(results_dir, ["camtrap-dp"], CamtrapOptions(), tmp_path)
    with pytest.raises(BirderError, match=r"camera folder '.*camB' has no GPS position.*--deployment-lat"):
        export_results(results_dir, ["camtrap-dp"], CamtrapOptions(timezone="+02:00"), tmp_path)
    assert tools_main(["export", str(results_dir), "--export", "camtrap-dp", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--timezone" in err and "\n" not in err
    with pytest.raises(BirderError, match="neither an offset"):
        parse_timezone("Mars/Olympus")
    assert parse_timezone("-05:30").utcoffset(None) == -dt.timedelta(hours=5, minutes=30)
    assert not (tmp_path / "camtrap-dp").exists()


def test_coco_camera_traps_validates(results_dir: Path, tmp_path: Path) -> None:
    (report,) = export_results(results_dir, ["coco-ct"], CamtrapOptions(), tmp_path)
    assert validate_coco_ct(report.path) == []
    document = json.loads(report.path.read_text())
    images = {image["file_name"]: image for image in document["images"]}
    assert len(images) == 5 and images["camA/0001.jpg"]["width"] == 60 and images["camA/0001.jpg"]["height"] == 40
    assert (
        images["camA/0001.jpg"]["datetime"] == "2023-05-14 07:00:00" and images["camA/0001.jpg"]["location"] == "camA"
    )
    assert "datetime" not in images["camB/0002.jpg"]
    assert document["categories"][0] == {"id": 0, "name": "empty"}
    assert all("bbox" not in annotation for annotation in document["annotations"])  # image-level labels

    document["annotations"].append({"id": 99, "image_id": "nowhere.jpg", "category_id": 1})
    document["images"][0]["width"] = "60"
    report.path.write_text(json.dumps(document))
    errors = validate_coco_ct(report.path)
    assert errors and "width" in errors[0]


def test_the_decision_label_is_what_is_exported(results_dir: Path, tmp_path: Path) -> None:
    # A run with the decision order's columns: the label (a genus, unknown) is the answer, not the top species
    results = read_results_folder(results_dir)
    for photo, label in zip(results.photos, ["Parus", "unknown", "Species A", "uncertain", "Species B"], strict=True):
        photo.update(label=label, label_probability="0.9" if label[0].isupper() else "")
    export_camtrap_dp(results, tmp_path / "dp", CamtrapOptions("+01:00", 47.0, 15.0))
    assert validate_camtrap_dp(tmp_path / "dp") == []
    observations = read_csv(tmp_path / "dp" / "observations.csv")
    assert [(row["observationType"], row["scientificName"]) for row in observations] == [
        ("animal", "Parus"),
        ("unknown", ""),
        ("animal", "Species A"),
        ("unknown", ""),
    ]
    assert observations[0]["classificationProbability"] == "0.9" and observations[1]["classificationProbability"] == ""
    report = export_coco_ct(results, tmp_path / "coco.json")
    names = [category["name"] for category in json.loads(report.path.read_text())["categories"]]
    assert names == ["empty", "Parus", "Species A", "Species B"]
