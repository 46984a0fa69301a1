"""``crops``: a classifier's training set from the boxes camera-trap projects publish or already have.

    python -m birder.tools crops lila.json -o crops/                             # COCO Camera Traps with boxes
    python -m birder.tools crops md.json --labels labels.csv -o crops/           # MegaDetector output + labels
    python -m birder.tools crops lila.json -o crops/ --split 0.7,0.15,0.15 --seed 3 --images-root /data/lila

Two inputs:

- a **COCO Camera Traps** file (LILA BC's layout): ``images`` with ``file_name`` and ``location`` (and ``seq_id``,
  ignored), ``annotations`` with ``bbox`` ``[x, y, width, height]`` in pixels, ``categories``. Annotations without
  a box (image-level labels) give no crop. An image without ``location`` is placed by its folder.
- a **MegaDetector batch output** (``images`` of ``file`` and ``detections``, boxes normalised) with ``--labels``:
  a CSV of ``path,label`` rows and an optional ``location`` column (default: the photo's folder, the camera),
  ``path`` as the batch output's ``file``. Every detection of a category not left out (MegaDetector's ``animal``)
  scoring at least ``--det-threshold`` gets its photo's label: a photo is taken to show one species.

Each box is cut with the margin rule of ``birder-predict --detector`` (:func:`birder.inference.crops.crop_box`:
``--crop-margin`` of the box's width and height on each side, clipped to the photo) into ``OUT/<split>/<class>/``,
ImageFolders that ``birder-train`` reads. Whole **locations** go to one split, so a test camera's background is
never seen in training: the locations are shuffled (``--seed``) and each goes to the split furthest below its share
of the crops (``--split`` train,val,test), every split with a share getting at least one location; fewer locations
than such splits is refused. Categories and labels named in ``--leave-out`` (empty, blank, human, person, vehicle...,
any case) give no crops.

``OUT`` also gets ``summary.csv`` (crops per class and split, as printed), ``crops.csv`` (every crop: its file,
photo, box, class, split, location), ``locations.csv`` (the split of each location) and ``unreadable.csv`` (photos
missing or not decodable: listed, not fatal). Every crop is written atomically; ``--resume`` continues an
interrupted run (the same split is recomputed and checked against ``locations.csv``). ``OUT`` follows the outputs rule
of every command (:mod:`birder.io.outputs`): one holding an earlier run's crops or tables is refused unless
``--resume`` or ``--overwrite`` (which removes what an earlier ``crops`` run wrote there first, and only that).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from birder.errors import BirderError
from birder.inference.crops import crop_box
from birder.io.atomic import atomic_write_path
from birder.io.images import load_image
from birder.io.outputs import OutputFolder, check_outside_photos

SPLITS = ("train", "val", "test")
DEFAULT_SPLIT = "0.8,0.1,0.1"
DEFAULT_MARGIN = 0.1  # as birder-predict --crop-margin
# MegaDetector's recommended threshold for its v5 models, where the file does not state its own
DEFAULT_MD_THRESHOLD = 0.2
DEFAULT_LEFT_OUT = ("empty", "blank", "nothing", "human", "humans", "person", "people", "vehicle", "car", "unknown")
SUMMARY_FILE = "summary.csv"
CROPS_FILE = "crops.csv"
LOCATIONS_FILE = "locations.csv"
UNREADABLE_FILE = "unreadable.csv"
OUTPUT_FILES = (SUMMARY_FILE, CROPS_FILE, LOCATIONS_FILE, UNREADABLE_FILE)
# What a crops run writes in its folder (birder.io.outputs): the tables, the crops of the split ImageFolders and the
# temporary files of a crop whose writing was cut short
OUTPUT_PATTERNS = (*OUTPUT_FILES, *(f"{split}/*/{name}" for split in SPLITS for name in ("*.jpg", ".*.tmp")))
PROG = "python -m birder.tools crops"
CROP_QUALITY = 95


@dataclass(frozen=True)
class BoxSource:
    """One box to cut: ``xywh`` in pixels, or fractions of the photo's size when ``normalised``."""

    image: str  # the path as the annotation file gives it (relative to the images root)
    location: str
    label: str
    number: int  # the box's place among its photo's kept boxes
    xywh: tuple[float, float, float, float]
    normalised: bool


@dataclass
class Annotations:
    boxes: list[BoxSource]
    left_out: Counter[str] = field(default_factory=Counter)  # category or label -> boxes (or photos) left out
    notes: list[str] = field(default_factory=list)


@dataclass
class CropReport:
    counts: dict[str, Counter[str]]  # split -> class -> crops on disk
    splits: dict[str, str]  # location -> split
    unreadable: list[tuple[str, str]]
    written: int  # crops cut by this run (the rest were there from an interrupted one)
    notes: list[str]

    @property
    def untrained_classes(self) -> list[str]:
        classes = set().union(*(counter.keys() for counter in self.counts.values()))
        return sorted(name for name in classes if not self.counts["train"][name])


# ---------------------------------------------------------------------------------------------------------------------
# Reading the annotations
# ---------------------------------------------------------------------------------------------------------------------


def _normal(name: Any) -> str:
    return str(name).strip().lower()


def _posix(path: str) -> str:
    return PurePosixPath(path.replace("\\", "/")).as_posix().removeprefix("./")


def _folder_of(path: str) -> str:
    parent = PurePosixPath(_posix(path)).parent.as_posix()
    return parent if parent != "." else "(top folder)"


def read_annotations(
    path: Path, labels: Path | None, left_out: Iterable[str], det_threshold: float | None
) -> Annotations:
    """The boxes of a COCO Camera Traps file, or of a MegaDetector batch output with ``labels`` (module doc)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BirderError(f"annotation file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BirderError(f"cannot read '{path}' as JSON: {' '.join(str(err).split())}") from None
    left_out = {_normal(name) for name in left_out}
    if det_threshold is not None and not 0.0 <= det_threshold <= 1.0:
        raise BirderError(f"--det-threshold must be between 0 and 1, got {det_threshold}")
    if isinstance(document, dict) and "detection_categories" in document and "images" in document:
        if labels is None:
            raise BirderError(f"'{path}' is a MegaDetector batch output: give --labels (a CSV of path,label rows)")
        return _read_megadetector(document, path, labels, left_out, det_threshold)
    if isinstance(document, dict) and {"images", "annotations", "categories"} <= document.keys():
        if labels is not None:
            raise BirderError(f"'{path}' is a COCO Camera Traps file with its own categories: leave out --labels")
        return _read_coco_camera_traps(document, path, left_out)
    raise BirderError(
        f"'{path}' is neither COCO Camera Traps (images, annotations, categories) nor a MegaDetector batch output "
        "(images, detection_categories)"
    )


def _read_coco_camera_traps(document: dict[str, Any], path: Path, left_out: set[str]) -> Annotations:
    try:
        categories = {category["id"]: str(category["name"]) for category in document["categories"]}
        images = {image["id"]: image for image in document["images"]}
        for image in images.values():
            str(image["file_name"])
    except (KeyError, TypeError) as err:
        raise BirderError(f"'{path}': an image or category without {err} (COCO Camera Traps)") from None

    result = Annotations([])
    numbers: Counter[Any] = Counter()
    (unplaced, bad) = (set(), 0)
    for annotation in document["annotations"]:
        if not isinstance(annotation, dict) or annotation.get("bbox") is None:
            continue  # an image-level label: no box to cut
        image = images.get(annotation.get("image_id"))
        name = categories.get(annotation.get("category_id"))
        try:
            (x, y, width, height) = (float(value) for value in annotation["bbox"])
        except (TypeError, ValueError):
            (x, y, width, height) = (0.0, 0.0, 0.0, 0.0)
        if image is None or name is None or width <= 0 or height <= 0:
            bad += 1
            continue
        if _normal(name) in left_out:
            result.left_out[name] += 1
            continue
        location = image.get("location")
        if location is None or str(location) == "":
            unplaced.add(image["id"])
            location = _folder_of(str(image["file_name"]))
        number = numbers[image["id"]]
        numbers[image["id"]] += 1
        xywh = (x, y, width, height)
        result.boxes.append(BoxSource(str(image["file_name"]), str(location), name, number, xywh, False))
    if bad:
        result.notes.append(f"{bad} annotations with no known image or category, or an empty box, skipped")
    if unplaced:
        result.notes.append(f"{len(unplaced)} photos without a location placed by their folder")
    return result


def _read_labels(labels: Path) -> dict[str, tuple[str, str | None]]:
    """``path -> (label, location or None)`` from a CSV with a header naming ``path`` and ``label``."""
    try:
        with open(labels, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except FileNotFoundError:
        raise BirderError(f"labels file '{labels}' does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise BirderError(f"cannot read labels file '{labels}': {' '.join(str(err).split())}") from None
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise BirderError(f"labels file '{labels}' needs a header with the columns path,label (and location)")
    table: dict[str, tuple[str, str | None]] = {}
    for number, row in enumerate(rows, start=2):
        (photo, label) = ((row.get("path") or "").strip(), (row.get("label") or "").strip())
        if not photo or not label:
            raise BirderError(f"labels file '{labels}', line {number}: a path and a label are needed")
        location = (row.get("location") or "").strip() or None
        if _posix(photo) in table and table[_posix(photo)][0] != label:
            raise BirderError(f"labels file '{labels}': '{photo}' has two labels")
        table[_posix(photo)] = (label, location)
    return table


def _typical_threshold(document: dict[str, Any], path: Path) -> float:
    """The detector's own typical threshold from the file's metadata, else MegaDetector's usual one."""
    info = document.get("info")
    metadata = info.get("detector_metadata") if isinstance(info, dict) else None
    value = metadata.get("typical_detection_threshold") if isinstance(metadata, dict) else None
    if value is None:
        return DEFAULT_MD_THRESHOLD
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        threshold = math.nan
    if not 0.0 <= threshold <= 1.0:
        raise BirderError(
            f"'{path}': typical_detection_threshold {value!r} is not a number from 0 to 1: give --det-threshold"
        )
    return threshold


def _read_megadetector(
    document: dict[str, Any], path: Path, labels: Path, left_out: set[str], det_threshold: float | None
) -> Annotations:
    table = _read_labels(labels)
    (categories, images) = (document["detection_categories"], document["images"])
    if not isinstance(categories, dict) or not isinstance(images, list):
        raise BirderError(
            f"'{path}' is not a MegaDetector batch output: 'detection_categories' must be an object and 'images' a list"
        )
    categories = {str(key): str(value) for (key, value) in categories.items()}
    if det_threshold is None:
        det_threshold = _typical_threshold(document, path)
    result = Annotations([])
    (unlabelled, matched, below, bad) = (0, set(), 0, 0)
    for image in images:
        if not isinstance(image, dict) or not isinstance(image.get("detections") or [], list):
            bad += 1  # not an image entry of the format: nothing to cut from it
            continue
        photo = _posix(str(image.get("file", "")))
        if photo not in table:
            unlabelled += 1
            continue
        matched.add(photo)
        (label, location) = table[photo]
        if _normal(label) in left_out:
            result.left_out[label] += 1
            continue
        number = 0
        for detection in image.get("detections") or []:
            if not isinstance(detection, dict):
                bad += 1
                continue
            category = categories.get(str(detection.get("category")), "")
            if _normal(category) in left_out:
                result.left_out[category] += 1
                continue
            try:
                (score, (x, y, width, height)) = (float(detection["conf"]), (float(v) for v in detection["bbox"]))
            except (KeyError, TypeError, ValueError):
                bad += 1
                continue
            if not all(math.isfinite(v) for v in (score, x, y, width, height)):
                bad += 1
                continue
            if score < det_threshold:
                below += 1
                continue
            if width <= 0 or height <= 0:
                bad += 1
                continue
            xywh = (x, y, width, height)
            result.boxes.append(BoxSource(photo, location or _folder_of(photo), label, number, xywh, True))
            number += 1
    result.notes.append(f"detections of at least {det_threshold:g} kept ({below} below it)")
    if bad:
        result.notes.append(f"{bad} detections (or image entries) without a usable score or box skipped")
    if unlabelled:
        result.notes.append(f"{unlabelled} photos of '{path.name}' have no label in '{labels.name}': left out")
    if len(table) > len(matched):
        result.notes.append(f"{len(table) - len(matched)} labelled photos are not in '{path.name}'")
    return result


# ---------------------------------------------------------------------------------------------------------------------
# The split by location
# ---------------------------------------------------------------------------------------------------------------------


def parse_split(text: str) -> tuple[float, float, float]:
    try:
        shares = tuple(float(part) for part in text.split(","))
    except ValueError:
        shares = ()
    if len(shares) != 3 or any(share < 0 for share in shares) or not shares[0] > 0:
        raise BirderError(f"--split '{text}': three shares train,val,test (e.g. 0.8,0.1,0.1), train above 0")
    total = sum(shares)
    return (shares[0] / total, shares[1] / total, shares[2] / total)


def split_locations(crops_per_location: dict[str, int], shares: Sequence[float], seed: int) -> dict[str, str]:
    """Each location -> a split: locations in a seeded shuffle, each to the split furthest below its share of the
    crops; the last locations go to splits still without one, so every split with a share gets a location."""
    wanted = [split for (split, share) in zip(SPLITS, shares, strict=True) if share > 0]
    if len(crops_per_location) < len(wanted):
        raise BirderError(
            f"{len(crops_per_location)} locations for {len(wanted)} splits ({', '.join(wanted)}): a location is never "
            "split, so each split needs one; give fewer splits (e.g. --split 0.8,0.2,0) or more locations"
        )
    order = sorted(crops_per_location)
    random.Random(seed).shuffle(order)
    total = sum(crops_per_location.values())
    target = dict(zip(SPLITS, (share * total for share in shares), strict=True))
    held = dict.fromkeys(wanted, 0)
    located: dict[str, str] = {}
    for remaining, location in zip(range(len(order), 0, -1), order, strict=True):
        empty = [split for split in wanted if not held[split]]
        candidates = empty if remaining <= len(empty) else wanted
        split = max(candidates, key=lambda name: (target[name] - held[name], -SPLITS.index(name)))
        located[location] = split
        held[split] += crops_per_location[location]
    return located


# ---------------------------------------------------------------------------------------------------------------------
# Cutting
# ---------------------------------------------------------------------------------------------------------------------


def class_folder(name: str) -> str:
    folder = name.replace("/", "_").replace("\\", "_").strip().strip(".")
    if not folder:
        raise BirderError(f"category '{name}' cannot be a folder name")
    return folder


def crop_name(box: BoxSource) -> str:
    """The crop's file name: the photo's path made flat (so two cameras' IMG_0001 stay apart) and the box."""
    stem = PurePosixPath(_posix(box.image)).with_suffix("").as_posix().replace("/", "__")
    return f"{stem}_box{box.number}.jpg"


def pixel_box(box: BoxSource, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """``x1, y1, x2, y2`` in the photo's pixels."""
    (x, y, width, height) = box.xywh
    if box.normalised:
        (x, width) = (x * size[0], width * size[0])
        (y, height) = (y * size[1], height * size[1])
    return (x, y, x + width, y + height)


def _claim_output(output: Path, inputs: Sequence[Path], overwrite: bool, resume: bool, located: dict[str, str]) -> None:
    """The outputs rule of every command (:mod:`birder.io.outputs`): a folder holding an earlier run's crops or tables
    is refused unless ``resume`` (then the split must be the earlier one) or ``overwrite`` (then those files, and
    only those, are deleted first); never onto the annotation or labels file."""
    folder = OutputFolder(output, PROG, OUTPUT_PATTERNS)
    earlier = folder.check(inputs=inputs, resume=resume, overwrite=overwrite)
    if resume and earlier:
        _check_resumed_split(output, located)
    folder.claim(inputs=inputs, resume=resume, overwrite=overwrite)
    if overwrite:
        # A class folder left empty in a split would be read by ImageFolder as a class without images
        for split in SPLITS:
            for sub in sorted((output / split).glob("*"), reverse=True):
                if sub.is_dir() and not sub.is_symlink() and not any(sub.iterdir()):
                    sub.rmdir()


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    with atomic_write_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _check_resumed_split(output: Path, located: dict[str, str]) -> None:
    path = output / LOCATIONS_FILE
    if not path.is_file():
        raise BirderError(f"'{output}' has no {LOCATIONS_FILE} of an earlier crops run: nothing to resume")
    with open(path, newline="", encoding="utf-8") as handle:
        earlier = {row["location"]: row["split"] for row in csv.DictReader(handle)}
    if earlier != located:
        raise BirderError(
            f"the split of '{output}' was made from other annotations, --split or --seed: give the same ones, or "
            "--overwrite"
        )


def cut_crops(
    annotations: Annotations,
    images_root: Path,
    output: Path,
    *,
    shares: Sequence[float],
    seed: int = 0,
    margin: float = DEFAULT_MARGIN,
    overwrite: bool = False,
    resume: bool = False,
    inputs: Sequence[Path] = (),
) -> CropReport:
    """Cut every box of ``annotations`` (photos under ``images_root``) into ``output``'s split ImageFolders;
    ``inputs``: the files read (never written over)."""
    if not margin >= 0:
        raise BirderError(f"--crop-margin must be a fraction >= 0, got {margin}")
    if not annotations.boxes:
        raise BirderError("no box to cut: every box was left out, or the file has none")
    folders: dict[str, str] = {}
    for label in sorted({box.label for box in annotations.boxes}):
        folder = class_folder(label)
        if folder in folders.values():
            raise BirderError(f"categories '{label}' and another both make the folder name '{folder}'")
        folders[label] = folder
    crops_per_location = Counter(box.location for box in annotations.boxes)
    located = split_locations(dict(crops_per_location), shares, seed)
    check_outside_photos(output, [images_root], "-o")  # the crops would be taken for camera-trap photos there
    _claim_output(output, inputs, overwrite, resume, located)
    _write_csv(
        output / LOCATIONS_FILE,
        ["location", "split", "boxes"],
        [(location, split, crops_per_location[location]) for (location, split) in sorted(located.items())],
    )

    by_photo: dict[str, list[BoxSource]] = defaultdict(list)
    for box in annotations.boxes:
        by_photo[box.image].append(box)
    counts: dict[str, Counter[str]] = {split: Counter() for split in SPLITS}
    (rows, unreadable, written) = ([], [], 0)
    for photo_name, boxes in sorted(by_photo.items()):
        targets = [output / located[box.location] / folders[box.label] / crop_name(box) for box in boxes]
        photo = None
        if not all(target.is_file() for target in targets):  # a resumed run opens only photos with crops to cut
            try:
                photo = load_image(images_root / photo_name)
            except (BirderError, OSError) as err:
                unreadable.append((photo_name, " ".join(str(err).split())))
                continue
        for box, target in zip(boxes, targets, strict=True):
            if photo is not None and not target.is_file():
                crop = crop_box(photo, pixel_box(box, photo.size), margin)
                with atomic_write_path(target) as tmp:
                    crop.save(tmp, format="JPEG", quality=CROP_QUALITY)
                written += 1
            split = located[box.location]
            counts[split][box.label] += 1
            rows.append((target.relative_to(output).as_posix(), photo_name, box.number, box.label, split, box.location))

    _write_csv(output / CROPS_FILE, ["crop", "photo", "box", "class", "split", "location"], rows)
    classes = sorted(set().union(*(counter.keys() for counter in counts.values())))
    _write_csv(
        output / SUMMARY_FILE,
        ["class", *SPLITS, "total"],
        [(name, *(counts[s][name] for s in SPLITS), sum(counts[s][name] for s in SPLITS)) for name in classes],
    )
    _write_csv(output / UNREADABLE_FILE, ["photo", "error"], unreadable)
    OutputFolder(output, PROG, OUTPUT_PATTERNS).finish()
    notes = list(annotations.notes)
    if annotations.left_out:
        listed = ", ".join(f"{name} {count}" for (name, count) in sorted(annotations.left_out.items()))
        notes.append(f"left out (--leave-out): {listed}")
    return CropReport(counts, located, unreadable, written, notes)


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def add_parser(subparsers: Any, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="cut the boxes of COCO Camera Traps or MegaDetector files into train/val/test ImageFolders",
        description="Cut each box of a COCO Camera Traps file (LILA) or of a MegaDetector batch output with "
        "image-level labels into train/, val/ and test/ ImageFolders, whole locations (cameras) in one split.",
    )
    parser.add_argument("annotations", metavar="ANNOTATIONS", help="COCO Camera Traps JSON, or MegaDetector output")
    parser.add_argument("-o", "--output-dir", required=True, help="the crops folder (train/, val/, test/, tables)")
    parser.add_argument("--images-root", help="the folder the file's paths are relative to (default: its folder)")
    parser.add_argument(
        "--labels", help="with a MegaDetector output: a CSV of path,label rows (optional location column)"
    )
    parser.add_argument(
        "--split",
        default=DEFAULT_SPLIT,
        help="shares of the crops for train,val,test, whole locations each (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the shuffle of the locations (default: 0)")
    parser.add_argument(
        "--crop-margin",
        type=float,
        default=DEFAULT_MARGIN,
        metavar="F",
        help="grow each crop by F of its box's width and height on each side, as birder-predict (default: 0.1)",
    )
    parser.add_argument(
        "--det-threshold",
        type=float,
        metavar="S",
        help="with a MegaDetector output: detections scoring at least S (default: the file's "
        f"typical_detection_threshold, else {DEFAULT_MD_THRESHOLD})",
    )
    parser.add_argument(
        "--leave-out",
        default=",".join(DEFAULT_LEFT_OUT),
        metavar="NAMES",
        help="comma-separated categories and labels that give no crops, any case (default: %(default)s)",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue an interrupted run into the same folder")
    group.add_argument("--overwrite", action="store_true", help="replace what an earlier crops run wrote there")


def print_summary(report: CropReport, output: Path) -> None:
    classes = sorted(set().union(*(counter.keys() for counter in report.counts.values())))
    width = max([len(name) for name in classes] + [5])
    print(f"{'class':<{width}}  " + "  ".join(f"{split:>6}" for split in SPLITS) + f"  {'total':>6}")
    for name in classes:
        numbers = [report.counts[split][name] for split in SPLITS]
        print(f"{name:<{width}}  " + "  ".join(f"{n:>6}" for n in numbers) + f"  {sum(numbers):>6}")
    totals = [sum(report.counts[split].values()) for split in SPLITS]
    print(f"{'all':<{width}}  " + "  ".join(f"{n:>6}" for n in totals) + f"  {sum(totals):>6}")
    places = Counter(report.splits.values())
    print("locations: " + ", ".join(f"{split} {places[split]}" for split in SPLITS))
    if report.untrained_classes:
        print(f"no training crops (all their locations went to val/test): {', '.join(report.untrained_classes)}")
    if report.unreadable:
        print(f"{len(report.unreadable)} photos missing or unreadable, listed in {output / UNREADABLE_FILE}")
    for note in report.notes:
        print(note)
    print(f"wrote {report.written} crops into {output} (summary in {output / SUMMARY_FILE})")


def run(args: argparse.Namespace) -> int:
    annotation_file = Path(args.annotations)
    left_out = [name for name in args.leave_out.split(",") if name.strip()]
    annotations = read_annotations(
        annotation_file, Path(args.labels) if args.labels else None, left_out, args.det_threshold
    )
    images_root = Path(args.images_root) if args.images_root else annotation_file.parent
    if not images_root.is_dir():
        raise BirderError(f"--images-root '{images_root}' is not a folder")
    output = Path(args.output_dir)
    report = cut_crops(
        annotations,
        images_root,
        output,
        shares=parse_split(args.split),
        seed=args.seed,
        margin=args.crop_margin,
        overwrite=args.overwrite,
        resume=args.resume,
        inputs=[annotation_file, *([Path(args.labels)] if args.labels else [])],
    )
    print_summary(report, output)
    return 0
