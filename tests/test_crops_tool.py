"""``python -m birder.tools crops``: boxes of COCO Camera Traps files (LILA's layout) or of a MegaDetector output with
image-level labels, cut with birder-predict's margin rule into train/val/test ImageFolders split by location; and
``birder-train-det``'s reader on the same COCO Camera Traps files.

The surveys are generated scenes (benchmarks/synthetic.py: shapes at known boxes on cluttered backgrounds), one
folder per camera location.
"""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.synthetic import make_scene
from birder.data.detection import read_coco
from birder.inference.crops import crop_box
from birder.io.images import load_image
from birder.tools.cli import main as tools_main

SPECIES = {0: "Rubra flava", 1: "Caerula alba"}  # scene class id -> category name
CATEGORY_IDS = {"empty": 0, "Rubra flava": 1, "Caerula alba": 2, "human": 3}
SIZE = (72, 96)  # (height, width)
LOCATIONS = [f"site{n}" for n in range(7)]
PHOTOS_PER_LOCATION = 3
MISSING = "site0/IMG_0999.JPG"
BROKEN = "site1/IMG_0998.JPG"


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_lila_survey(root: Path, seed: int = 0) -> Path:
    """A COCO Camera Traps file as LILA publishes them: string ids, ``location`` and ``seq_id`` per image, boxes in
    pixels, an ``empty`` image-level label for photos without animals, a boxed human, a photo whose file is missing
    and one that cannot be decoded."""
    rng = np.random.default_rng(seed)
    (images, annotations) = ([], [])

    def annotate(image_id: str, category: str, bbox: list[float] | None = None) -> None:
        annotation = {
            "id": f"{image_id}#{len(annotations)}",
            "image_id": image_id,
            "category_id": CATEGORY_IDS[category],
        }
        if bbox is not None:
            annotation["bbox"] = bbox
        annotations.append(annotation)

    for location in LOCATIONS:
        (root / location).mkdir(parents=True)
        for shot in range(PHOTOS_PER_LOCATION):
            scene = make_scene(rng, size=SIZE, classes=[0, 1], num_objects=(0, 2), area_range=(0.05, 0.12))
            file_name = f"{location}/IMG_{shot + 1:04d}.JPG"
            scene.image.save(root / file_name, quality=95)
            image_id = f"{location}_{shot}"
            images.append(
                {
                    "id": image_id,
                    "file_name": file_name,
                    "width": SIZE[1],
                    "height": SIZE[0],
                    "location": location,
                    "seq_id": f"{location}_seq{shot // 2}",
                    "seq_num_frames": 2,
                    "frame_num": shot % 2,
                    "datetime": f"2021-06-0{shot + 1} 10:00:00",
                }
            )
            for box, label in zip(scene.boxes, scene.labels, strict=True):
                annotate(image_id, SPECIES[label], [float(v) for v in box])
            if not scene.boxes:
                annotate(image_id, "empty")
    annotate("site2_0", "human", [2.0, 3.0, 20.0, 30.0])
    for name in (MISSING, BROKEN):
        images.append({"id": name, "file_name": name, "width": SIZE[1], "height": SIZE[0], "location": name[:5]})
        annotate(name, "Rubra flava", [5.0, 5.0, 20.0, 20.0])
    (root / BROKEN).write_bytes(b"\xff\xd8 not a whole JPEG")
    document = {
        "info": {"version": "1.0", "description": "generated survey", "date_created": "2021-07-01"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": number, "name": name} for (name, number) in CATEGORY_IDS.items()],
    }
    path = root / "survey.json"
    path.write_text(json.dumps(document))
    return path


def _crops_on_disk(output: Path) -> dict[tuple[str, str], int]:
    found: Counter[tuple[str, str]] = Counter()
    for path in output.glob("*/*/*.jpg"):
        found[(path.parent.parent.name, path.parent.name)] += 1
    return dict(found)


def _printed_counts(printed: str) -> dict[tuple[str, str], int]:
    """(split, class) -> crops, from the table the command prints."""
    lines = printed.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("class ")))
    counts = {}
    for line in lines[header + 1 :]:
        if line.startswith("all "):
            break
        cells = line.rsplit(maxsplit=4)
        for split, number in zip(("train", "val", "test"), cells[1:4], strict=True):
            if int(number):
                counts[(split, cells[0].strip())] = int(number)
    return counts


@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lila_survey(tmp_path_factory.mktemp("lila") / "photos")


def test_whole_locations_per_split_and_the_printed_counts_are_the_files(
    survey: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    output = tmp_path / "crops"
    assert tools_main(["crops", str(survey), "-o", str(output), "--split", "0.6,0.2,0.2", "--seed", "1"]) == 0
    printed = capsys.readouterr().out

    rows = _read_csv(output / "crops.csv")
    split_of_location = defaultdict(set)
    for row in rows:
        split_of_location[row["location"]].add(row["split"])
        assert Path(output / row["crop"]).is_file() and row["crop"].startswith(f"{row['split']}/{row['class']}/")
    assert all(len(splits) == 1 for splits in split_of_location.values())  # no location in two splits
    assert {next(iter(s)) for s in split_of_location.values()} == {"train", "val", "test"}  # each split has one
    located = {row["location"]: row["split"] for row in _read_csv(output / "locations.csv")}
    assert {location: next(iter(s)) for (location, s) in split_of_location.items()} == {
        location: split for (location, split) in located.items() if location in split_of_location
    }

    on_disk = _crops_on_disk(output)
    assert _printed_counts(printed) == on_disk
    summary = {row["class"]: row for row in _read_csv(output / "summary.csv")}
    assert {(s, c): int(summary[c][s]) for (s, c) in on_disk} == on_disk
    assert sum(on_disk.values()) == len(rows) and f"wrote {len(rows)} crops" in printed

    # Every box of a kept category is there; empty and human give none
    document = json.loads(survey.read_text())
    boxed = [a for a in document["annotations"] if "bbox" in a and a["category_id"] in (1, 2)]
    assert len(rows) == len(boxed) - 2  # the missing and the broken photo's boxes
    assert {c for (_, c) in on_disk} == set(SPECIES.values())
    assert "left out (--leave-out): human 1" in printed
    unreadable = {row["photo"]: row["error"] for row in _read_csv(output / "unreadable.csv")}
    assert set(unreadable) == {MISSING, BROKEN} and all(unreadable.values())
    assert "2 photos missing or unreadable" in printed


def test_crops_follow_the_detector_crop_margin_rule(survey: Path, tmp_path: Path) -> None:
    output = tmp_path / "crops"
    margin = 0.25
    assert tools_main(["crops", str(survey), "-o", str(output), "--crop-margin", str(margin)]) == 0
    document = json.loads(survey.read_text())
    images = {image["id"]: image["file_name"] for image in document["images"]}
    boxes = defaultdict(list)
    for annotation in document["annotations"]:
        if "bbox" in annotation and annotation["category_id"] in (1, 2):
            boxes[images[annotation["image_id"]]].append(annotation["bbox"])
    rows = _read_csv(output / "crops.csv")
    assert rows
    for row in rows:
        (x, y, w, h) = boxes[row["photo"]][int(row["box"])]
        expected = crop_box(load_image(survey.parent / row["photo"]), (x, y, x + w, y + h), margin)
        with Image.open(output / row["crop"]) as crop:
            assert crop.size == expected.size
            difference = np.abs(np.asarray(crop.convert("RGB"), float) - np.asarray(expected, float)).mean()
        assert difference < 6  # the same pixels, through JPEG


def test_megadetector_output_with_image_labels(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(5)
    photos = tmp_path / "photos"
    (images, labels) = ([], ["path,label"])
    expected: Counter[tuple[str, str]] = Counter()
    for number in range(8):
        camera = f"cam{number % 4}"
        scene = make_scene(rng, size=SIZE, classes=[number % 2], num_objects=(1, 2), area_range=(0.05, 0.12))
        name = f"{camera}/{number:04d}.JPG"
        (photos / camera).mkdir(parents=True, exist_ok=True)
        scene.image.save(photos / name, quality=95)
        label = SPECIES[number % 2] if number != 7 else "Empty"  # a reviewer's 'empty' on a false detection
        labels.append(f"{name},{label}")
        detections = [
            {"category": "1", "conf": 0.9, "bbox": [x / SIZE[1], y / SIZE[0], w / SIZE[1], h / SIZE[0]]}
            for (x, y, w, h) in scene.boxes
        ]
        detections.append({"category": "2", "conf": 0.95, "bbox": [0.0, 0.0, 0.2, 0.5]})  # a person: left out
        detections.append({"category": "1", "conf": 0.1, "bbox": [0.5, 0.5, 0.2, 0.2]})  # below the threshold
        images.append({"file": name, "detections": detections})
        if number != 7:
            expected[(camera, label)] += len(scene.boxes)
    images.append({"file": "cam0/broken.JPG", "failure": "Failure image access", "detections": None})
    md = {
        "info": {"format_version": "1.4", "detector": "md_v5a.0.0.pt", "detector_metadata": {}},
        "detection_categories": {"1": "animal", "2": "person", "3": "vehicle"},
        "images": images,
    }
    (photos / "md.json").write_text(json.dumps(md))
    (tmp_path / "labels.csv").write_text("\n".join(labels) + "\n")

    output = tmp_path / "crops"
    args = ["crops", str(photos / "md.json"), "--labels", str(tmp_path / "labels.csv"), "-o", str(output)]
    assert tools_main([*args, "--split", "0.5,0.25,0.25", "--crop-margin", "0"]) == 0
    printed = capsys.readouterr().out
    rows = _read_csv(output / "crops.csv")
    assert Counter((row["location"], row["class"]) for row in rows) == expected  # locations: the camera folders
    assert _printed_counts(printed) == _crops_on_disk(output)
    assert "left out (--leave-out): Empty 1, person 7" in printed  # the empty photo is skipped whole
    assert "detections of at least 0.2 kept (7 below it)" in printed
    for row in rows[:4]:
        (x, y, w, h) = next(d for d in images if d["file"] == row["photo"])["detections"][int(row["box"])]["bbox"]
        photo = load_image(photos / row["photo"])
        box = (x * photo.width, y * photo.height, (x + w) * photo.width, (y + h) * photo.height)
        with Image.open(output / row["crop"]) as crop:
            assert crop.size == crop_box(photo, box, 0.0).size


def test_output_refusals_resume_and_too_few_locations(
    survey: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    output = tmp_path / "crops"
    assert tools_main(["crops", str(survey), "-o", str(output)]) == 0
    first = _crops_on_disk(output)
    capsys.readouterr()

    assert tools_main(["crops", str(survey), "-o", str(output), "--seed", "4"]) == 2
    error = capsys.readouterr().err
    assert "already holds the results of" in error and "--overwrite" in error and error.count("\n") == 1

    # An interrupted run: crops missing; --resume cuts only those, with the same split
    removed = sorted(output.glob("*/*/*.jpg"))[:3]
    for path in removed:
        path.unlink()
    assert tools_main(["crops", str(survey), "-o", str(output), "--resume"]) == 0
    assert "wrote 3 crops" in capsys.readouterr().out and _crops_on_disk(output) == first
    assert tools_main(["crops", str(survey), "-o", str(output), "--resume", "--seed", "4"]) == 2
    assert "other annotations, --split or --seed" in capsys.readouterr().err

    (output / "train" / "stale").mkdir()
    assert tools_main(["crops", str(survey), "-o", str(output), "--overwrite", "--seed", "4"]) == 0
    assert not (output / "train" / "stale").exists()

    # Two locations, one species each: a location is never split, so with train and val one species has no
    # training crop, and the command names it
    document = json.loads(survey.read_text())
    document["images"] = [image for image in document["images"] if image["id"] in ("site3_0", "site4_0")]
    document["annotations"] = [
        {"id": "a", "image_id": "site3_0", "category_id": 1, "bbox": [4.0, 4.0, 30.0, 20.0]},
        {"id": "b", "image_id": "site4_0", "category_id": 2, "bbox": [10.0, 8.0, 24.0, 30.0]},
    ]
    two = survey.parent / "two.json"
    two.write_text(json.dumps(document))
    assert tools_main(["crops", str(two), "-o", str(tmp_path / "few")]) == 2
    error = capsys.readouterr().err
    assert "2 locations for 3 splits" in error and "--split 0.8,0.2,0" in error and error.count("\n") == 1
    assert tools_main(["crops", str(two), "-o", str(tmp_path / "few"), "--split", "1,1,0"]) == 0
    printed = capsys.readouterr().out
    located = {row["location"]: row["split"] for row in _read_csv(tmp_path / "few" / "locations.csv")}
    assert sorted(located.values()) == ["train", "val"]
    untrained = "Rubra flava" if located["site3"] == "val" else "Caerula alba"
    assert f"no training crops (all their locations went to val/test): {untrained}\n" in printed


def test_train_det_reads_coco_camera_traps(survey: Path) -> None:
    data = read_coco(survey)
    assert data.class_to_idx == {"Rubra flava": 0, "Caerula alba": 1, "human": 2}  # empty is no class
    document = json.loads(survey.read_text())
    empty = {a["image_id"] for a in document["annotations"] if a["category_id"] == 0}
    empty -= {a["image_id"] for a in document["annotations"] if "bbox" in a}  # the human on one of them
    assert empty
    by_file = {image.path.relative_to(survey.parent).as_posix(): image for image in data.images}
    files = {image["id"]: image["file_name"] for image in document["images"]}
    assert {files[image_id] for image_id in empty} <= set(by_file)  # negatives kept
    assert all(not by_file[files[image_id]].boxes for image_id in empty)
    boxed = [a for a in document["annotations"] if "bbox" in a and files[a["image_id"]] in by_file]
    assert data.num_boxes == len(boxed)
    assert len({image.image_id for image in data.images}) == len(data.images)  # string ids numbered once each
    assert not any(problem.startswith("annotation") for problem in data.problems)

    # A species label without a box: its photo is left out (the animal would be taught as background)
    document["annotations"].append({"id": "x", "image_id": "site3_0", "category_id": 1})
    for annotation in [a for a in document["annotations"] if a["image_id"] == "site3_0" and "bbox" in a]:
        document["annotations"].remove(annotation)
    (survey.parent / "unboxed.json").write_text(json.dumps(document))
    unboxed = read_coco(survey.parent / "unboxed.json")
    assert files["site3_0"] not in {image.path.relative_to(survey.parent).as_posix() for image in unboxed.images}
    assert any("site3_0" in problem and "without a box" in problem for problem in unboxed.problems)


@pytest.mark.slow  # a minute on two cores: one epoch of a tiny detector and its COCO evaluation
def test_train_det_trains_on_a_coco_camera_traps_file(survey: Path, tmp_path: Path) -> None:
    from conftest import TINY_VIT_CONFIG

    from birder.net.detection.checkpoint import load_detector
    from birder.scripts import train_det

    args = ["--network", "retinanet", "--backbone", "vit_t16", "--backbone-config", json.dumps(TINY_VIT_CONFIG)]
    args += ["--model-config", json.dumps({"fpn_channels": 16, "anchor_sizes": [16, 32, 64, 128]})]
    args += ["--train-json", str(survey), "--val-json", str(survey), "--output-dir", str(tmp_path / "run")]
    args += ["--size", "64", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--no-progress"]
    assert train_det.main(args) == 0
    (_, info) = load_detector(tmp_path / "run" / "retinanet_vit_t16_1.pt")
    assert set(info.class_to_idx) == {"Rubra flava", "Caerula alba", "human"}


def test_crops_output_follows_the_outputs_rule(survey: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The folder's other files are the user's: a folder holding only them is written into, and --overwrite
    deletes the earlier run's crops and tables, never them."""
    output = tmp_path / "crops"
    output.mkdir()
    (output / "README.txt").write_text("my notes\n")
    (output / "train").mkdir()
    (output / "train" / "keep.txt").write_text("mine\n")
    assert tools_main(["crops", str(survey), "-o", str(output)]) == 0
    first = _crops_on_disk(output)
    assert first and (output / ".birder-outputs.json").is_file()

    stale = output / "val" / "Old species" / "x_box0.jpg"  # a class of the earlier run only
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes((next(output.glob("*/*/*.jpg"))).read_bytes())
    capsys.readouterr()
    assert tools_main(["crops", str(survey), "-o", str(output), "--overwrite"]) == 0
    assert _crops_on_disk(output) == first and not stale.parent.exists()
    assert (output / "README.txt").read_text() == "my notes\n" and (output / "train" / "keep.txt").is_file()
