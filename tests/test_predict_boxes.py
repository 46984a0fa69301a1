"""``birder-predict --boxes FILE``: the boxes a user already has (MegaDetector, SpeciesNet, COCO) cropped and
classified as ``--detector`` crops are, people and vehicles passed through, the file written back with the species.

The boxes are the tiny detector's own (tests/detect_support.py, MegaDetector's categories: animal, person, vehicle):
a ``--detector`` run's boxes are rewritten in another tool's conventions (relative paths, Windows separators,
normalised ``[x, y, width, height]`` to 4 decimals, no species), with a person, a vehicle and detections below the
threshold added to one photo, a photo of the run left out and paths that match no photo; the ``--boxes`` run must
give each box the species the ``--detector`` run gave it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from detect_support import BOXES_PER_PHOTO, save_tiny_detector
from PIL import Image, ImageFile
from test_predict import BAD_PHOTOS, CLASSES, GOOD_PHOTOS, make_photo_folder, save_tiny_model
from test_predict_cli import _interrupt_after

from birder.errors import BirderError
from birder.geo.validate import validate_camtrap_dp, validate_md_json
from birder.runs.detect import DetectionSteps, check_options
from birder.runs.predict import run_steps
from birder.runs.predict_options import DetectionOptions, PredictionOptions
from birder.scripts.predict import build_parser, main, options_from_args

MD_CATEGORIES = ("animal", "person", "vehicle")
TOP_K = 3
MARGIN = 0.2
# The photo that gets a person, a vehicle and detections below the threshold beside its animals (it has EXIF time
# and position: its boxes are Camtrap DP observations)
CROWDED = "Species C/rotated.jpg"
NOT_LISTED = "Species B/cmyk.jpg"  # a photo of the run the file does not list
UNMATCHED = ["elsewhere/IMG_0001.JPG", "Species A\\gone.jpg", "camB/IMG_0002.JPG", "camB/IMG_0003.JPG"]
WINDOWS = "loose/UPPER.JPEG"  # written with a backslash, as MegaDetector writes paths on Windows
# (category, conf, bbox) added to CROWDED: kept as rows; the first two pass through as a person and a vehicle, the
# low ones are no observation
EXTRA = [
    ("2", 0.91, [0.05, 0.1, 0.3, 0.4]),
    ("3", 0.77, [0.5, 0.5, 0.45, 0.3]),
    ("1", 0.12, [0.2, 0.2, 0.2, 0.2]),
    ("2", 0.05, [0.6, 0.1, 0.2, 0.2]),
]
DEPLOYMENT = ["--timezone", "+01:00", "--deployment-lat", "48.2", "--deployment-lon", "16.4"]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _boxes_of(rows: list[dict[str, str]]) -> dict[tuple[str, int], dict[str, str]]:
    return {(row["path"], int(row["box"])): row for row in rows if row["box"] != ""}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The photos, the models, a ``--detector`` run with its md-json, and its boxes as another tool writes them."""
    root = tmp_path_factory.mktemp("boxes")
    taxonomy = root / "taxonomy.csv"
    taxonomy.write_text("species,genus,family,order\n" + "".join(f"{name},Avis,Avidae,Aviformes\n" for name in CLASSES))
    world: dict[str, Any] = {
        "root": root,
        "classifier": save_tiny_model(root / "tiny.pt"),
        "detector": save_tiny_detector(root / "md.pt", MD_CATEGORIES),
        "photos": make_photo_folder(root / "photos"),
        "taxonomy": taxonomy,
    }
    detected = root / "detected"
    assert main(_args(world, detected, "--detector", str(world["detector"]), "--export", "md-json")) == 0
    world["detected"] = detected
    world["md"] = json.loads((detected / "megadetector.json").read_text())
    path = root / "addax" / "md_output.json"
    path.parent.mkdir()
    path.write_text(json.dumps(other_tools_md(world["md"]), indent=1))
    world["boxes_file"] = path
    return world


def _args(world: dict[str, Any], output: Path, *extra: str) -> list[str]:
    args = ["--weights", str(world["classifier"]), str(world["photos"]), "-j", "0", "--no-progress"]
    args += ["--top-k", str(TOP_K), "--crop-margin", str(MARGIN), "--taxonomy", str(world["taxonomy"])]
    return [*args, "--output-dir", str(output), *extra]


def other_tools_md(detector_md: dict[str, Any]) -> dict[str, Any]:
    """The boxes of a ``--detector`` run's md-json as MegaDetector (through AddaxAI, on Windows) writes them: no
    species, its own info block, a Windows path, a person, a vehicle and low scores beside CROWDED's animals,
    NOT_LISTED left out, paths that are no photo of the run; the failed photos as failures."""
    images = []
    for image in detector_md["images"]:
        file = image["file"]
        if file == NOT_LISTED:
            continue
        entry: dict[str, Any] = {"file": file.replace("/", "\\") if file == WINDOWS else file}
        if "failure" in image:
            entry.update(failure=image["failure"], detections=None)
        else:
            entry["detections"] = [
                {"category": "1", "conf": detection["conf"], "bbox": detection["bbox"]}
                for detection in image["detections"]
            ]
            if file == CROWDED:
                entry["detections"] += [{"category": c, "conf": conf, "bbox": bbox} for (c, conf, bbox) in EXTRA]
        images.append(entry)
    images += [{"file": file, "detections": []} for file in UNMATCHED]
    info = {
        "detection_completion_time": "2024-03-01 10:00:00",
        "format_version": "1.4",
        "detector": "md_v5a.0.0.pt",
        "detector_metadata": {"megadetector_version": "v5a.0.0", "typical_detection_threshold": 0.2},
    }
    return {"images": images, "detection_categories": dict(enumerate(MD_CATEGORIES, start=1)), "info": info}


@pytest.fixture(scope="module")
def from_file(world: dict[str, Any]) -> Path:
    """The ``--boxes`` run of the other tool's file, written back as md-json."""
    out = world["root"] / "from-file"
    assert main(_args(world, out, "--boxes", str(world["boxes_file"]), "-b", "4", "--export", "md-json")) == 0
    return out


def _assert_same_species(got: dict[str, str], expected: dict[str, str]) -> None:
    """A box classified from the file as the detector's run classified it (the file's box is the detector's to 4
    decimals: the crop may differ by a pixel's rounding)."""
    for i in range(1, TOP_K + 1):
        assert got[f"top{i}_class"] == expected[f"top{i}_class"]
        assert float(got[f"top{i}_prob"]) == pytest.approx(float(expected[f"top{i}_prob"]), abs=2e-3)
    assert (got["prediction"], got["label"], got["rank"]) == (expected["prediction"], expected["label"], "species")
    assert float(got["label_probability"]) == pytest.approx(float(expected["label_probability"]), abs=2e-3)
    corners = ("x1", "y1", "x2", "y2")
    assert [float(got[k]) for k in corners] == pytest.approx([float(expected[k]) for k in corners], abs=0.02)
    assert float(got["det_score"]) == pytest.approx(float(expected["det_score"]), abs=1e-4)


def test_boxes_of_another_tool_get_the_species_the_detector_run_gives(
    world: dict[str, Any], from_file: Path, capsys: pytest.CaptureFixture
) -> None:
    detected = _boxes_of(_read_csv(world["detected"] / "results.csv"))
    rows = _read_csv(from_file / "results.csv")
    boxes = _boxes_of(rows)
    compared = 0
    for name in GOOD_PHOTOS:
        path = str(world["photos"] / name)
        if name == NOT_LISTED:
            assert not any(row["path"] == path for row in rows)
            continue
        for number in range(BOXES_PER_PHOTO):
            got = boxes[(path, number)]
            assert (got["source"], got["det_class"], got["detections"]) == (
                "detection",
                "animal",
                str(BOXES_PER_PHOTO + (len(EXTRA) if name == CROWDED else 0)),
            )
            _assert_same_species(got, detected[(path, number)])
            compared += 1
    assert compared == BOXES_PER_PHOTO * (len(GOOD_PHOTOS) - 1)
    photos = {row["path"]: row["detections"] for row in _read_csv(from_file / "photos.csv")}
    # Counted: the animals and the person and vehicle at or above the threshold
    assert photos[str(world["photos"] / CROWDED)] == str(BOXES_PER_PHOTO + 2)
    run = json.loads((from_file / "run.json").read_text())
    assert run["summary"]["boxes"] == compared and run["summary"]["boxes_passed_through"] == 2


def test_people_vehicles_and_low_scores_pass_through_untouched(world: dict[str, Any], from_file: Path) -> None:
    path = world["photos"] / CROWDED
    sizes = {row["path"]: (int(row["width"]), int(row["height"])) for row in _read_csv(from_file / "photos.csv")}
    (width, height) = sizes[str(path)]  # the photo as shown (EXIF orientation applied), as the file's boxes are
    stored = Image.open(path).size
    assert (width, height) == (stored[1], stored[0])  # orientation 6: turned a quarter
    boxes = _boxes_of(_read_csv(from_file / "results.csv"))
    names = dict(enumerate(MD_CATEGORIES, start=1))
    for offset, (category, conf, (x, y, w, h)) in enumerate(EXTRA):
        row = boxes[(str(path), BOXES_PER_PHOTO + offset)]
        expected_source = "passed" if conf >= 0.5 else ""
        assert (row["det_class"], row["source"]) == (names[int(category)], expected_source)
        assert float(row["det_score"]) == pytest.approx(conf, abs=1e-6)
        corners = [float(row[k]) for k in ("x1", "y1", "x2", "y2")]
        assert corners == pytest.approx([x * width, y * height, (x + w) * width, (y + h) * height], abs=0.01)
        assert row["prediction"] == row["top1_class"] == row["top1_prob"] == row["label"] == ""
        assert row["gps_latitude"] != ""  # EXIF as for every row


def test_failed_missing_and_unmatched_photos_are_failures(
    world: dict[str, Any], from_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    failures = {row["path"]: row["error"] for row in _read_csv(from_file / "failures.csv")}
    photos = world["photos"]
    by_file = {image["file"]: image for image in world["md"]["images"]}
    for name in BAD_PHOTOS:
        # The file's own reason (the photo is never decoded)
        assert failures[str(photos / name)] == f"failed in the boxes file 'md_output.json': {by_file[name]['failure']}"
    assert failures[str(photos / NOT_LISTED)] == "not in the boxes file 'md_output.json'"
    for file in UNMATCHED:
        reason = failures[str(photos / file.replace("\\", "/"))]
        assert reason.startswith("in the boxes file 'md_output.json' but no photo of this run")
    assert len(failures) == len(BAD_PHOTOS) + 1 + len(UNMATCHED)

    # The warning: one line, how many, the first few
    assert main(_args(world, tmp_path / "again", "--boxes", str(world["boxes_file"]))) == 0
    captured = capsys.readouterr()
    (warning,) = [line for line in captured.err.splitlines() if "match no photo" in line]
    assert warning.startswith("birder-predict: warning: 4 path(s) of the boxes file")
    assert all(f"'{file}'" in warning for file in UNMATCHED[:3]) and UNMATCHED[3] not in warning
    assert "and 1 more" in warning
    assert f"{len(BAD_PHOTOS) + 1} not classified" in captured.out


def _megadetector_validator() -> Any:
    """MegaDetector's validator; importing megadetector turns on decoding of truncated JPEGs for the whole process,
    which the other tests' unreadable photos must not see."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        return pytest.importorskip("megadetector.postprocessing.validate_batch_results")
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def test_md_json_is_the_file_written_back_with_the_species(world: dict[str, Any], from_file: Path) -> None:
    path = from_file / "megadetector.json"
    validator = _megadetector_validator()
    options = validator.ValidateBatchResultsOptions()
    results = validator.validate_batch_results(str(path), options)["validation_results"]
    assert (results["errors"], results["warnings"]) == ([], [])
    assert validate_md_json(path) == []

    original = json.loads(world["boxes_file"].read_text())
    written = json.loads(path.read_text())
    names = written["classification_categories"]
    assert sorted(names.values()) == sorted(CLASSES)
    descriptions = written["classification_category_descriptions"]
    assert {names[cid]: text for (cid, text) in descriptions.items()} == {
        name: f";;aviformes;avidae;avis;;{name}" for name in CLASSES
    }
    assert written["info"]["classifier"] == "tiny.pt" and written["info"]["classification_completion_time"]
    boxes = _boxes_of(_read_csv(from_file / "results.csv"))
    classified = 0
    for before, after in zip(original["images"], written["images"], strict=True):
        assert {k: v for (k, v) in after.items() if k != "detections"} == {
            k: v for (k, v) in before.items() if k != "detections"
        }
        if before["detections"] is None:
            assert after["detections"] is None
            continue
        path_of = str(world["photos"] / before["file"].replace("\\", "/"))
        for number, (old, new) in enumerate(zip(before["detections"], after["detections"], strict=True)):
            assert {k: v for (k, v) in new.items() if k != "classifications"} == old  # untouched
            row = boxes.get((path_of, number))
            if row is None or row["source"] != "detection":
                assert "classifications" not in new
                continue
            classified += 1
            assert [(names[cid], score) for (cid, score) in new["classifications"]] == [
                (row[f"top{i}_class"], pytest.approx(float(row[f"top{i}_prob"]), abs=1e-4)) for i in range(1, TOP_K + 1)
            ]
    assert classified == BOXES_PER_PHOTO * (len(GOOD_PHOTOS) - 1)
    assert {k: v for (k, v) in written["info"].items() if not k.startswith("classif")} == original["info"]
    assert json.loads(world["boxes_file"].read_text()) == original  # the input itself is never written


def _speciesnet(world: dict[str, Any]) -> dict[str, Any]:
    """The detector run's boxes as SpeciesNet's predictions (absolute paths, a label per detection, failures)."""
    predictions = []
    for image in world["md"]["images"]:
        entry: dict[str, Any] = {"filepath": str(world["photos"] / image["file"])}
        if "failure" in image:
            entry["failures"] = ["DETECTOR"]
        else:
            entry["detections"] = [
                {"category": "1", "label": "animal", "conf": d["conf"], "bbox": d["bbox"]} for d in image["detections"]
            ]
            entry["prediction"] = "blank"
        predictions.append(entry)
    return {"predictions": predictions}


def _coco(world: dict[str, Any]) -> dict[str, Any]:
    """The detector run's boxes as a COCO results file: pixel boxes (from results.csv), a score per box."""
    rows = _read_csv(world["detected"] / "results.csv")
    photos = _read_csv(world["detected"] / "photos.csv")
    sizes = {row["path"]: (int(row["width"]), int(row["height"])) for row in photos}
    images = []
    annotations = []
    for number, (path, (width, height)) in enumerate(sizes.items()):
        images.append({"id": f"img{number}", "file_name": Path(path).relative_to(world["photos"]).as_posix()})
        images[-1].update(width=width, height=height)
        for row in rows:
            if row["path"] == path:
                (x1, y1, x2, y2) = (float(row[k]) for k in ("x1", "y1", "x2", "y2"))
                annotation = {"id": len(annotations), "image_id": f"img{number}", "category_id": 1}
                annotation.update(bbox=[x1, y1, x2 - x1, y2 - y1], score=float(row["det_score"]))
                annotations.append(annotation)
    categories = [{"id": i, "name": name} for (i, name) in enumerate(MD_CATEGORIES, start=1)]
    return {"images": images, "annotations": annotations, "categories": categories}


@pytest.mark.parametrize("kind", ["speciesnet", "coco"])
def test_speciesnet_and_coco_boxes_get_the_same_species(world: dict[str, Any], tmp_path: Path, kind: str) -> None:
    document = _speciesnet(world) if kind == "speciesnet" else _coco(world)
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps(document))
    out = tmp_path / "out"
    assert main(_args(world, out, "--boxes", str(path), "--export", "md-json")) == 0
    detected = _boxes_of(_read_csv(world["detected"] / "results.csv"))
    got = _boxes_of(_read_csv(out / "results.csv"))
    assert set(got) == set(detected)
    for key, row in got.items():
        _assert_same_species(row, detected[key])
    failures = {row["path"]: row["error"] for row in _read_csv(out / "failures.csv")}
    assert sorted(failures) == sorted(str(world["photos"] / name) for name in BAD_PHOTOS)
    if kind == "speciesnet":
        assert set(failures.values()) == {"failed in the boxes file 'speciesnet.json': DETECTOR"}
    # Written back as a MegaDetector batch output (the file is none): every box with its species
    written = json.loads((out / "megadetector.json").read_text())
    assert validate_md_json(out / "megadetector.json") == []
    assert sum(len(image["detections"] or []) for image in written["images"]) == len(detected)
    assert all("classifications" in d for image in written["images"] for d in image["detections"] or [])


def test_resume_matches_a_straight_run_and_refuses_another_file(
    world: dict[str, Any], from_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    args = _args(world, tmp_path / "resumed", "--boxes", str(world["boxes_file"]), "--export", "md-json")
    small = ["-b", "2", "--chunk-size", "1"]
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 3)
        assert main([*args, *small]) == 130
    assert "--resume" in capsys.readouterr().err
    assert main([*args, *small, "--resume"]) == 0
    assert "Resuming:" in capsys.readouterr().err
    for table in ("results", "photos", "failures"):
        got = _read_csv(tmp_path / "resumed" / f"{table}.csv")
        expected = _read_csv(from_file / f"{table}.csv")
        assert [(r["path"], r.get("box")) for r in got] == [(r["path"], r.get("box")) for r in expected], table
        for a, b in zip(got, expected, strict=True):
            for key, value in a.items():
                if key.endswith(("_prob", "_score", "probability")) and value:
                    assert float(value) == pytest.approx(float(b[key]), abs=1e-5)
                else:
                    assert value == b[key], key
    md = json.loads((tmp_path / "resumed" / "megadetector.json").read_text())
    classified = sum("classifications" in d for image in md["images"] for d in image["detections"] or [])
    assert classified == BOXES_PER_PHOTO * (len(GOOD_PHOTOS) - 1)

    # The same file name with other boxes in it is another run
    changed = tmp_path / "changed.json"
    changed.write_text(world["boxes_file"].read_text().replace('"conf": 0.91', '"conf": 0.92'))
    args = _args(world, tmp_path / "resumed", "--boxes", str(changed), "--resume")
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "boxes" in error and "cannot --resume" in error


def test_events_and_camtrap_dp_count_boxes_people_and_vehicles(world: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "chain"
    args = _args(world, out, "--boxes", str(world["boxes_file"]), "--events", "--export", "camtrap-dp", *DEPLOYMENT)
    assert main(args) == 0
    rows = _read_csv(out / "results.csv")
    crowded = [row for row in rows if row["path"] == str(world["photos"] / CROWDED)]
    (event,) = {row["event_id"] for row in crowded}
    observed = {row["observation_type"]: row for row in _read_csv(out / "events.csv") if row["event_id"] == event}
    # One person and one vehicle: the person below the threshold is no observation
    assert (observed["human"]["count"], observed["vehicle"]["count"]) == ("1", "1")
    assert {"human", "vehicle"} < set(observed) and not {"blank"} & set(observed)

    package = out / "camtrap-dp"
    assert validate_camtrap_dp(package) == []
    media = {row["mediaID"]: row["filePath"] for row in _read_csv(package / "media.csv")}
    per_box = [row for row in _read_csv(package / "observations.csv") if row["observationLevel"] == "media"]
    mine = [row for row in per_box if media[row["mediaID"]].endswith("rotated.jpg")]
    kinds = sorted(row["observationType"] for row in mine)
    assert len(mine) == BOXES_PER_PHOTO + 2 and kinds.count("human") == kinds.count("vehicle") == 1
    (person,) = [row for row in mine if row["observationType"] == "human"]
    assert [float(person[k]) for k in ("bboxX", "bboxY", "bboxWidth", "bboxHeight")] == pytest.approx(
        EXTRA[0][2], abs=1e-5
    )


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--boxes", "{boxes_file}", "--detector", "{detector}"], "give one of the two, not both"),
        (["--boxes-root", "{root}"], "--boxes-root is about detected boxes: it needs --detector FILE"),
        (["--detector", "{detector}", "--boxes-root", "{root}"], "--boxes-root is where the paths of a --boxes"),
        (["--boxes", "{root}/missing.json"], "--boxes '{root}/missing.json' does not exist"),
        (["--boxes", "{classifier}"], "is not readable JSON"),
        (["--boxes", "{taxonomy}"], "is not readable JSON"),
        (["--boxes", "{boxes_file}", "--boxes-root", "{root}/nowhere"], "is not a folder"),
        (["--boxes", "{boxes_file}", "--save-probabilities"], "--save-probabilities is not available with --boxes"),
    ],
)
def test_bad_inputs_are_one_line(
    world: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], fragment: str
) -> None:
    named = {key: str(value) for (key, value) in world.items() if isinstance(value, Path)}
    args = ["--weights", str(world["classifier"]), str(world["photos"]), "-j", "0", "--no-progress"]
    args += [item.format(**named) for item in extra]
    assert main([*args, "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("birder-predict: error: ") and error.count("\n") == 1, error
    assert fragment.format(**named) in error, error
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_the_options_land_in_the_detection_group() -> None:
    argv = ["photos/", "--boxes", "md.json", "--boxes-root", "card/", "--det-threshold", "0.2", "--export", "md-json"]
    options = options_from_args(build_parser().parse_args(argv))
    assert options.detection == DetectionOptions(
        boxes="md.json", boxes_root="card/", det_threshold=0.2, exports=("md-json",)
    )
    assert isinstance(run_steps(options), DetectionSteps)
    assert "md.json" in [str(path) for path in options.input_files()]  # never an output


def test_a_library_caller_gives_exactly_one_source() -> None:
    options = PredictionOptions(["photos/"])
    with pytest.raises(BirderError, match=r"exactly one of the two \(neither given\)"):
        check_options(options, DetectionOptions())
    with pytest.raises(BirderError, match=r"exactly one of the two \(both given\)"):
        check_options(options, DetectionOptions(detector="d.pt", boxes="b.json"))


def test_the_boxes_file_is_an_input_never_overwritten(world: dict[str, Any], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    inside = out / "megadetector.json"  # where --export md-json would write
    inside.write_bytes(world["boxes_file"].read_bytes())
    args = _args(world, out, "--boxes", str(inside), "--export", "md-json", "--overwrite")
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "is one of this command's inputs" in error and error.count("\n") == 1
    assert inside.read_bytes() == world["boxes_file"].read_bytes()


def test_shards_of_a_manifest_merge_like_one_run(world: dict[str, Any], tmp_path: Path, capsys) -> None:
    """A manifest's photos (the file's paths then start at the photos' common folder), in two jobs: each takes its
    block's boxes from the file; merged, they are the one run's tables but for the file's unmatched paths, which
    only a run that sees every photo can name."""
    from birder.tools.cli import main as tools

    manifest = tmp_path / "photos.txt"
    names = sorted([*GOOD_PHOTOS, *BAD_PHOTOS])
    manifest.write_text("".join(f"{world['photos'] / name}\n" for name in names))
    args = ["--weights", str(world["classifier"]), "--manifest", str(manifest), "-j", "0", "--no-progress"]
    args += ["--top-k", str(TOP_K), "--boxes", str(world["boxes_file"])]
    for k in (1, 2):
        assert main([*args, "--shard", f"{k}/2", "--output-dir", str(tmp_path / f"shard{k}")]) == 0
    assert "match no photo" not in capsys.readouterr().err
    assert main([*args, "--output-dir", str(tmp_path / "whole")]) == 0
    assert "4 path(s) of the boxes file" in capsys.readouterr().err
    assert tools(["merge-results", str(tmp_path / "shard1"), str(tmp_path / "shard2"), "-o", str(tmp_path / "m")]) == 0
    for table in ("results", "photos", "failures"):
        merged = _read_csv(tmp_path / "m" / f"{table}.csv")
        whole = _read_csv(tmp_path / "whole" / f"{table}.csv")
        if table == "failures":
            whole = [row for row in whole if "no photo of this run" not in row["error"]]
            assert len(whole) == len(BAD_PHOTOS) + 1
        assert [(r["path"], r.get("box"), r.get("top1_class")) for r in merged] == [
            (r["path"], r.get("box"), r.get("top1_class")) for r in whole
        ], table


def test_photos_without_a_box_above_the_threshold_may_get_the_whole_image_answer(
    world: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "whole"
    args = ["--boxes", str(world["boxes_file"]), "--det-threshold", "0.95", "--fallback-whole-image"]
    assert main(_args(world, out, *args)) == 0
    rows = _read_csv(out / "results.csv")
    listed = [name for name in GOOD_PHOTOS if name != NOT_LISTED]
    for name in listed:
        mine = [row for row in rows if row["path"] == str(world["photos"] / name)]
        # Every detection of the file kept as a row (none counted, none classified), then the whole photo's answer
        extra = len(EXTRA) if name == CROWDED else 0
        assert [row["source"] for row in mine] == [""] * (BOXES_PER_PHOTO + extra) + ["whole-image"]
        assert mine[-1]["top1_class"] in CLASSES and all(row["top1_class"] == "" for row in mine[:-1])
    assert {row["detections"] for row in _read_csv(out / "photos.csv")} == {"0"}
