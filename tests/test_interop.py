"""What birder writes for camera-trap work, read by the field's own tools (the ``interop`` extra): MegaDetector's
batch-output validator and COCO Camera Traps checks (megadetector-utils), CamTrapTools' ``ingest`` + ``import``,
the ``camtrapdp`` reader, pycocotools.

A generated survey: two cameras of EXIF-timed JPEGs with GPS and one unreadable photo, a tiny detector whose
categories are MegaDetector's (animal, person, vehicle; three animal boxes per photo), a tiny classifier of
binomial species names with a taxonomy. Every tool runs offline, in-process, in temporary folders.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_tiny_vit
from detect_support import BOXES_PER_PHOTO, save_tiny_detector
from PIL import ImageFile
from test_geo_export import camera_exif
from test_predict import MODEL_SIZE, RGB_STATS, random_photo

import birder
from birder.scripts.predict import main as predict_main

# megadetector's visualization module turns on decoding of truncated JPEGs for the whole process when imported (here,
# at collection): every other test of unreadable photos would then see them decoded. Kept as it was before.
_LOAD_TRUNCATED = ImageFile.LOAD_TRUNCATED_IMAGES
validate_batch_results = pytest.importorskip("megadetector.postprocessing.validate_batch_results")
integrity_check = pytest.importorskip("megadetector.data_management.integrity_check_json_db")
cct_json_utils = pytest.importorskip("megadetector.data_management.cct_json_utils")
camtraptools_cli = pytest.importorskip("camtraptools.cli")
camtrapdp = pytest.importorskip("camtrapdp")
pycocotools_coco = pytest.importorskip("pycocotools.coco")
ImageFile.LOAD_TRUNCATED_IMAGES = _LOAD_TRUNCATED


@pytest.fixture(autouse=True)
def _truncated_images_stay_unreadable() -> Iterator[None]:
    yield
    ImageFile.LOAD_TRUNCATED_IMAGES = _LOAD_TRUNCATED


SPECIES = ["Rubra flava", "Rubra alba", "Caerula flava", "Caerula nigra", "Caerula rosea"]
LINEAGE = {"Rubra": ("Rubridae", "Disciformes"), "Caerula": ("Caerulidae", "Disciformes")}
MD_CATEGORIES = ("animal", "person", "vehicle")
START = dt.datetime(2023, 5, 14, 7, 0, 0)
CAMERAS = {"camA": (48.2082, 16.3738), "camB": (47.0707, 15.4395)}
SHOTS_PER_CAMERA = 3
UNREADABLE = "camA/IMG_9999.JPG"
CLOCK = "+02:00"


def _answers(results_dir: Path, photos: Path) -> dict[str, str]:
    """Photo path relative to ``photos`` -> birder's answer (the decision's label: a species, a genus, uncertain)."""
    with open(results_dir / "results.csv", newline="", encoding="utf-8") as handle:
        return {Path(row["path"]).relative_to(photos).as_posix(): row["label"] for row in csv.DictReader(handle)}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def make_survey(root: Path) -> list[str]:
    """Camera folders of timed, georeferenced JPEGs (as a camera writes them) and one half-written file; the readable
    photos' paths relative to ``root``."""
    readable = []
    for number, (camera, position) in enumerate(CAMERAS.items()):
        (root / camera).mkdir(parents=True)
        for shot in range(SHOTS_PER_CAMERA):
            name = f"{camera}/IMG_{shot + 1:04d}.JPG"
            taken = START + dt.timedelta(days=number, minutes=10 * shot)
            random_photo(10 * number + shot).save(root / name, exif=camera_exif(taken, position), quality=92)
            readable.append(name)
    (root / UNREADABLE).write_bytes((root / readable[0]).read_bytes()[:64])  # a card's half-written file
    return readable


@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | list[str]]:
    tmp = tmp_path_factory.mktemp("interop")
    net = make_tiny_vit(num_classes=len(SPECIES), size=MODEL_SIZE, seed=3)
    info = birder.ModelInfo({name: i for (i, name) in enumerate(SPECIES)}, None, RGB_STATS)
    taxonomy = tmp / "taxonomy.csv"
    rows = ["species,genus,family,order"]
    rows += [f"{name},{name.split()[0]},{','.join(LINEAGE[name.split()[0]])}" for name in SPECIES]
    taxonomy.write_text("\n".join(rows) + "\n", encoding="utf-8")
    photos = tmp / "photos"
    return {
        "photos": photos,
        "readable": make_survey(photos),
        "classifier": birder.save_model(net, tmp / "tiny.pt", info),
        "detector": save_tiny_detector(tmp / "det.pt", MD_CATEGORIES),
        "taxonomy": taxonomy,
        "tmp": tmp,
    }


def _predict(survey: dict, output: Path, *extra: str) -> Path:
    args = ["--weights", str(survey["classifier"]), str(survey["photos"]), "-j", "0", "--no-progress"]
    assert predict_main([*args, "--output-dir", str(output), *extra]) == 0
    return output


@pytest.fixture(scope="module")
def md_runs(survey: dict) -> dict[str, Path]:
    """Every kind of md-json birder-predict writes: boxes with a taxonomy, boxes without, no box at all."""
    detector = ["--detector", str(survey["detector"]), "--export", "md-json", "--top-k", "3"]
    runs = {
        "taxonomy": _predict(survey, survey["tmp"] / "md-taxonomy", *detector, "--taxonomy", str(survey["taxonomy"])),
        "plain": _predict(survey, survey["tmp"] / "md-plain", *detector),
        "no-boxes": _predict(survey, survey["tmp"] / "md-none", *detector, "--det-threshold", "0.95"),
    }
    return {name: folder / "megadetector.json" for (name, folder) in runs.items()}


def test_every_md_json_passes_megadetectors_validator_without_warnings(md_runs: dict[str, Path], survey) -> None:
    options = validate_batch_results.ValidateBatchResultsOptions()
    options.check_image_existence = True
    options.relative_path_base = str(survey["photos"])
    for name, path in md_runs.items():
        results = validate_batch_results.validate_batch_results(str(path), options)["validation_results"]
        assert (results["errors"], results["warnings"]) == ([], []), name
        document = json.loads(path.read_text())
        (failed,) = [image for image in document["images"] if "failure" in image]
        assert failed["file"] == UNREADABLE and failed["detections"] is None
        boxes = sum(len(image["detections"] or []) for image in document["images"])
        assert boxes == (0 if name == "no-boxes" else BOXES_PER_PHOTO * len(survey["readable"]))
        assert document["detection_categories"] == {"1": "animal", "2": "person", "3": "vehicle"}


def _camtraptools(*args: str) -> str:
    from typer.testing import CliRunner

    result = CliRunner().invoke(camtraptools_cli.app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _top_species(md_json: Path) -> dict[tuple[str, int], str]:
    """(file, detection number) -> the species birder ranked first for that box."""
    document = json.loads(md_json.read_text())
    names = document["classification_categories"]
    return {
        (image["file"], number): names[detection["classifications"][0][0]]
        for image in document["images"]
        for (number, detection) in enumerate(image["detections"] or [])
    }


@pytest.mark.parametrize("run", ["taxonomy", "plain"])
def test_camtraptools_imports_every_detection_and_species(
    md_runs: dict[str, Path], survey: dict, tmp_path: Path, run: str
) -> None:
    package = tmp_path / "package"
    printed = _camtraptools("ingest", str(survey["photos"]), "--out", str(package))
    assert f"Found {len(survey['readable']) + 1} images from {len(CAMERAS)} deployments" in printed
    printed = _camtraptools("import", str(package), str(md_runs[run]))
    assert f"Imported results for {len(survey['readable']) + 1} of {len(survey['readable']) + 1} images" in printed
    assert "not in the package" not in printed  # every path of ours matched one of the package's

    expected = _top_species(md_runs[run])
    assert len(expected) == BOXES_PER_PHOTO * len(survey["readable"])
    imported = json.loads((package / "speciesnet.json").read_text())
    detections = {
        (prediction["filepath"], number): detection
        for prediction in imported["predictions"]
        for (number, detection) in enumerate(prediction.get("detections") or [])
    }
    assert set(detections) == set(expected)
    assert {detection["label"] for detection in detections.values()} == {"animal"}

    observations = _read_csv(package / "observations.csv")
    boxes = [row for row in observations if row["bboxX"]]
    assert len(boxes) == len(expected) and {row["observationType"] for row in boxes} == {"animal"}
    assert all(float(row["classificationProbability"]) > 0 for row in boxes)
    by_photo: dict[str, list[str]] = {}
    for row in boxes:
        by_photo.setdefault(row["mediaID"], []).append(row["scientificName"])
    for photo in survey["readable"]:
        ours = [expected[(photo, number)] for number in range(BOXES_PER_PHOTO)]
        # With the taxonomy, the species is a scientific name there; without, CamTrapTools keeps it as a label only
        assert by_photo[photo] == (ours if run == "taxonomy" else [""] * BOXES_PER_PHOTO)
    (failed,) = [row for row in observations if row["mediaID"] == UNREADABLE]
    assert failed["observationType"] == "unclassified"
    # The summary counts each photo with our boxes as one with animals (MegaDetector's category names)
    summary = printed.split("Images with detections")[1].split("Images per species")[0]
    for camera in CAMERAS:
        (row,) = [line.split() for line in summary.splitlines() if line.startswith(camera)]
        readable = sum(photo.startswith(camera + "/") for photo in survey["readable"])
        assert dict(zip(("images", "animal", "empty"), (int(row[1]), int(row[2]), int(row[5])), strict=True)) == {
            "images": readable + (camera == UNREADABLE.split("/")[0]),
            "animal": readable,
            "empty": int(camera == UNREADABLE.split("/")[0]),
        }
    species_table = printed.split("Images per species:")[1]
    assert all(name in species_table for name in set(expected.values()))


@pytest.fixture(scope="module")
def exports(survey: dict) -> Path:
    """A whole-image run with both exports (Camtrap DP needs the clock's timezone)."""
    args = ["--export", "camtrap-dp", "--export", "coco-ct", "--timezone", CLOCK, "--taxonomy", str(survey["taxonomy"])]
    return _predict(survey, survey["tmp"] / "exports", *args)


def test_camtrap_dp_validates_and_camtrapdp_reads_it(exports: Path, survey: dict) -> None:
    from birder.geo.validate import validate_camtrap_dp

    package = exports / "camtrap-dp"
    assert validate_camtrap_dp(package) == []  # frictionless, the shipped Camtrap DP 1.0.2 table schemas
    answers = _answers(exports, survey["photos"])

    deployments = camtrapdp.Deployment.from_csv(str(package / "deployments.csv"))
    assert sorted(d.deploymentID for d in deployments) == sorted(CAMERAS)
    for deployment in deployments:
        assert float(deployment.latitude) == pytest.approx(CAMERAS[deployment.deploymentID][0], abs=1e-6)
    media = camtrapdp.Media.from_csv(str(package / "media.csv"))
    assert sorted(m.filePath for m in media) == sorted(survey["readable"])
    assert all(m.timestamp.endswith(CLOCK) for m in media)
    observations = camtrapdp.Observation.from_csv(str(package / "observations.csv"))
    by_media = {o.mediaID: o for o in observations}
    assert set(by_media) == {m.mediaID for m in media}
    for item in media:
        answer = answers[item.filePath]
        observation = by_media[item.mediaID]
        if answer in SPECIES or answer in LINEAGE:
            assert (observation.observationType, observation.scientificName) == ("animal", answer)
        else:
            assert (observation.observationType, observation.scientificName) == ("unknown", "")


def test_coco_ct_loads_in_pycocotools_and_megadetectors_tools(exports: Path, survey: dict) -> None:
    path = exports / "coco-ct.json"
    coco = pycocotools_coco.COCO(str(path))
    assert sorted(image["file_name"] for image in coco.imgs.values()) == sorted(survey["readable"])
    assert coco.cats[0]["name"] == "empty"
    labelled = {coco.imgs[a["image_id"]]["file_name"]: coco.cats[a["category_id"]]["name"] for a in coco.anns.values()}
    answers = _answers(exports, survey["photos"])
    assert labelled == {name: answer for (name, answer) in answers.items() if answer in (*SPECIES, *LINEAGE)}

    # MegaDetector's COCO Camera Traps integrity check: string ids, locations, sizes that match the files
    options = integrity_check.IntegrityCheckOptions()
    options.baseDir = str(survey["photos"])
    (options.bCheckImageSizes, options.bCheckImageExistence, options.bRequireLocation) = (True, True, True)
    (options.nThreads, options.verbose, options.requireInfo) = (1, False, True)
    (_, _, errors) = integrity_check.integrity_check_json_db(str(path), options)
    assert errors["validation_errors"] == []
    indexed = cct_json_utils.IndexedJsonDb(str(path))
    assert len(indexed.image_id_to_image) == len(survey["readable"])
    assert {image["location"] for image in indexed.db["images"]} == set(CAMERAS)
