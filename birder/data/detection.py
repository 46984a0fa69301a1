"""Detection data: COCO-format annotation files, checked item by item, and the datasets training reads.

A bad item (a box outside its image, a missing image file, an unknown category id) is one warning line naming it;
the rest is used. Nothing valid left is an error. Images without boxes are kept: they teach the detector what is
not an animal (negatives).

Labels are ``0..K-1`` in the order of the categories' ids; ``class_to_idx`` maps the category names to them.

COCO Camera Traps files (LILA's layout) are read as they are: string image ids, extra keys (``location``,
``seq_id``...) ignored, and annotations without ``bbox`` taken as image-level labels: an ``empty``/``blank`` one
marks a negative image (those categories are no classes), any other leaves its image out unless it also has boxes
(an unboxed animal must not be taught as background).
"""

import itertools
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from birder.data.training import DataError, SampleKey, load_readable, sample_seed
from birder.data.transforms import detection_transform
from birder.errors import one_line
from birder.io.checkpoint import names_by_index

logger = logging.getLogger(__name__)

# How far (pixels) a box may overhang its image: annotation tools round outwards.
_BOX_TOLERANCE = 1.0
# Bad items named one by one before the rest are only counted.
_MAX_NAMED_PROBLEMS = 20
# Categories of COCO Camera Traps files that say nothing is there: image-level labels of negatives, no classes
EMPTY_CATEGORY_NAMES = frozenset({"empty", "blank"})


@dataclass
class CocoImage:
    image_id: int
    path: Path
    height: int
    width: int
    boxes: list[list[float]] = field(default_factory=list)  # xyxy pixels
    labels: list[int] = field(default_factory=list)  # 0..K-1


@dataclass
class CocoData:
    """The usable part of a COCO file; ``ground_truth`` is the same, as a COCO dict, for the mAP evaluation."""

    images: list[CocoImage]
    class_to_idx: dict[str, int]
    category_ids: list[int]  # category id of each label index
    ground_truth: dict[str, Any]
    problems: list[str]

    @property
    def num_boxes(self) -> int:
        return sum(len(image.boxes) for image in self.images)

    def without(self, indices: Iterable[int]) -> "CocoData":
        """The same data without the images at ``indices`` and their boxes: a photo that turns out unreadable is
        left out of the scores exactly as a missing file is (its boxes would count as objects never found)."""
        dropped = set(indices)
        if not dropped:
            return self
        kept = [image for (index, image) in enumerate(self.images) if index not in dropped]
        ground_truth = _ground_truth(kept, self.category_ids, self.class_to_idx)
        return CocoData(kept, self.class_to_idx, self.category_ids, ground_truth, self.problems)


class _Problems:
    def __init__(self, source: Path) -> None:
        (self.source, self.items) = (source, [])

    def add(self, message: str) -> None:
        self.items.append(message)
        if len(self.items) <= _MAX_NAMED_PROBLEMS:
            logger.warning("%s: %s (skipped)", self.source, message)

    def summarize(self) -> None:
        if len(self.items) > _MAX_NAMED_PROBLEMS:
            logger.warning("%s: %d more bad items skipped", self.source, len(self.items) - _MAX_NAMED_PROBLEMS)


def read_coco(
    annotation_file: str | Path, images_root: str | Path | None = None, class_to_idx: Mapping[str, int] | None = None
) -> CocoData:
    """The images and boxes of a COCO ``annotation_file``; ``file_name`` s are relative to ``images_root`` (default:
    the file's folder). ``class_to_idx`` (a validation file read with the training file's) fixes the label order.

    What makes the whole file wrong is a :class:`~birder.data.training.DataError` naming it: not a JSON object with
    ``images`` and ``categories`` lists, a bad or repeated category, an image id listed twice (two photos would be
    scored as one), an annotation whose ``image_id`` names no image of the file (its boxes would vanish). A bad
    item otherwise (a box outside its image, a missing image file, an unknown category id) is a warning, skipped.
    """
    path = Path(annotation_file)
    coco = _load_json(path)
    categories = _categories(coco, path)
    image_entries = _entries(coco, "images", path)
    annotations = _entries(coco, "annotations", path) if "annotations" in coco else []

    root = Path(images_root) if images_root is not None else path.parent
    empty_ids = {cat_id for cat_id, name in categories.items() if name.strip().lower() in EMPTY_CATEGORY_NAMES}
    if class_to_idx is None:
        classes = sorted(set(categories) - empty_ids)
        class_to_idx = {categories[cat_id]: idx for idx, cat_id in enumerate(classes)}
    label_of = {cat_id: class_to_idx[name] for cat_id, name in categories.items() if name in class_to_idx}
    problems = _Problems(path)
    (images, listed) = _read_images(image_entries, root, problems)
    unboxed: dict[int | str, set[int]] = {}  # image -> categories labelled on it without a box
    for ann in annotations:
        _add_annotation(ann, images, listed, label_of, problems, empty_ids, unboxed)
    for key, category_ids in unboxed.items():
        if not images[key].boxes:
            labels = ", ".join(sorted(categories.get(cat_id, str(cat_id)) for cat_id in category_ids))
            problems.add(f"image {key} ({images[key].path.name}): labelled {labels} without a box")
            del images[key]
    problems.summarize()

    kept = list(images.values())
    if any(not isinstance(key, int) for key in images):  # string ids (COCO Camera Traps): numbered for training
        for number, image in enumerate(kept, start=1):
            image.image_id = number
    if not kept:
        first = one_line(problems.items[0]) if problems.items else "the file lists none"
        raise DataError(f"{path}: no usable image ({len(problems.items)} bad items, first: {first})")

    # A class of the model the file has no category for gets an id no category of the file uses
    unused = itertools.count(max(categories, default=0) + 1)
    category_ids = [next(unused) for _ in range(len(class_to_idx))]
    for cat_id, idx in label_of.items():
        category_ids[idx] = cat_id
    return CocoData(
        kept, dict(class_to_idx), category_ids, _ground_truth(kept, category_ids, class_to_idx), problems.items
    )


def _load_json(path: Path) -> dict[str, Any]:
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such annotation file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise DataError(f"{path}: not a readable JSON file ({type(err).__name__}: {one_line(err, 200)})") from None
    if not isinstance(coco, dict):
        raise DataError(f"{path}: not a COCO annotation file (expected a JSON object with 'images' and 'categories')")
    return coco


def _entries(coco: dict[str, Any], key: str, path: Path) -> list[Any]:
    if not isinstance(coco.get(key), list):
        found = "none" if key not in coco else type(coco[key]).__name__
        raise DataError(f"{path}: not a COCO annotation file ('{key}' must be a list, found {found})")
    return coco[key]


def _shown(item: Any, limit: int = 80) -> str:
    """An item of the file as a message shows it: on one line, cut short."""
    text = " ".join((item if isinstance(item, str) else json.dumps(item, default=str)).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _integer_id(value: Any) -> int | None:
    """A COCO id (an integer, also as an integral float or a numeric string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _image_key(value: Any) -> int | str | None:
    """An image id as COCO (an integer, or digits) or COCO Camera Traps (any non-empty string) writes it."""
    number = _integer_id(value)
    if number is not None:
        return number
    return value if isinstance(value, str) and value else None


def _positive_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def _categories(coco: dict[str, Any], path: Path) -> dict[int, str]:
    """Category id -> name. A bad or repeated category is an error: the categories are the classes."""
    categories: dict[int, str] = {}
    ids_of: dict[str, int] = {}
    for entry in _entries(coco, "categories", path):
        cat_id = _integer_id(entry.get("id")) if isinstance(entry, dict) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        if cat_id is None or not isinstance(name, str) or not name:
            raise DataError(f"{path}: category {_shown(entry)} needs an integer 'id' and a 'name'")
        if cat_id in categories:
            raise DataError(f"{path}: category id {cat_id} is listed twice: category ids must be unique")
        if name in ids_of:
            raise DataError(
                f"{path}: category name {_shown(name)} is used by ids {ids_of[name]} and {cat_id}: names must be "
                "unique (they are the class names)"
            )
        (categories[cat_id], ids_of[name]) = (name, cat_id)
    return categories


def _read_images(
    entries: Sequence[Any], root: Path, problems: _Problems
) -> tuple[dict[int | str, CocoImage], set[int | str]]:
    """The usable images by id, and the ids of every image the file lists (usable or not)."""
    images: dict[int | str, CocoImage] = {}
    listed: dict[int | str, str] = {}  # id -> file_name as given
    for entry in entries:
        image_id = _image_key(entry.get("id")) if isinstance(entry, dict) else None
        if image_id is None:
            problems.add(f"image entry {_shown(entry)} has no id (an integer or a string)")
            continue
        file_name = entry.get("file_name")
        if image_id in listed:
            raise DataError(
                f"{problems.source}: image id {image_id} is listed twice ({_shown(listed[image_id])} and "
                f"{_shown(file_name)}): image ids must be unique"
            )
        listed[image_id] = file_name
        if not isinstance(file_name, str) or not file_name:
            problems.add(f"image {image_id}: no file_name")
            continue

        image_path = root / file_name
        if not image_path.is_file():
            problems.add(f"image {image_id} ({_shown(file_name)}): no such file {_shown(str(image_path), 200)}")
            continue
        size = _image_size(entry, image_id, image_path, problems)
        if size is not None:
            number = image_id if isinstance(image_id, int) else 0  # string ids are numbered once all are read
            images[image_id] = CocoImage(number, image_path, *size)

    return (images, set(listed))


def _image_size(
    entry: dict[str, Any], image_id: int | str, image_path: Path, problems: _Problems
) -> tuple[int, int] | None:
    """``(height, width)`` as the entry gives them, else from the file's header; None (reported) when neither."""
    given = (entry.get("height"), entry.get("width"))
    (height, width) = (_positive_number(value) for value in given)
    if height is not None and width is not None:
        return (int(height), int(width))
    if any(value not in (None, 0) for value in given):
        problems.add(f"image {image_id}: height and width must be positive numbers, got {_shown(list(given))}")
        return None
    try:
        with Image.open(image_path) as handle:
            (width, height) = handle.size
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        problems.add(f"image {image_id} ({_shown(image_path.name)}): unreadable ({one_line(err, 120)})")
        return None
    return (int(height), int(width))


def _add_annotation(
    ann: Any,
    images: dict[int | str, CocoImage],
    listed: set[int | str],
    label_of: Mapping[int, int],
    problems: _Problems,
    empty_ids: set[int],
    unboxed: dict[int | str, set[int]],
) -> None:
    name = f"annotation {_shown(ann.get('id', '?'), 40)}" if isinstance(ann, dict) else f"annotation {_shown(ann, 40)}"
    fields = (ann.get("image_id"), ann.get("category_id"), ann.get("bbox")) if isinstance(ann, dict) else (None,) * 3
    (image_id, category_id) = (_image_key(fields[0]), _integer_id(fields[1]))
    bbox = fields[2]
    image_level = isinstance(ann, dict) and bbox is None  # no "bbox", or null
    box_ok = isinstance(bbox, list) and len(bbox) == 4
    box_ok = box_ok and all(not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v) for v in bbox)
    if image_id is None or category_id is None or not (box_ok or image_level):
        problems.add(f"{name}: needs an image_id, an integer category_id and a bbox [x, y, width, height] of numbers")
        return

    if image_id not in listed:
        raise DataError(
            f"{problems.source}: {name} names image id {image_id}, which no image of the file has: "
            "its boxes would be lost; fix the image_id or list the image"
        )
    if image_level:  # an image-level label (COCO Camera Traps): nothing to learn a box from
        if category_id not in empty_ids and image_id in images:
            unboxed.setdefault(image_id, set()).add(category_id)
        return
    image = images.get(image_id)
    if image is None:
        return  # its image was reported (missing or unreadable file): nothing to attach it to
    if category_id not in label_of:
        problems.add(f"{name} (image {image_id}): unknown category id {category_id}")
        return
    if ann.get("iscrowd", 0):
        return  # crowd regions are neither objects to find nor background
    (x, y, w, h) = (float(v) for v in bbox)
    tol = _BOX_TOLERANCE
    if w <= 0 or h <= 0 or x < -tol or y < -tol or x + w > image.width + tol or y + h > image.height + tol:
        problems.add(f"{name} (image {image_id}): box {[x, y, w, h]} outside its {image.width}x{image.height} image")
        return

    box = [max(x, 0.0), max(y, 0.0), min(x + w, image.width), min(y + h, image.height)]
    if box[2] <= box[0] or box[3] <= box[1]:  # all in the rounding margin, or too thin to survive float sums
        problems.add(f"{name} (image {image_id}): box {[x, y, w, h]} has no area inside its image")
        return
    image.boxes.append(box)
    image.labels.append(label_of[category_id])


def _ground_truth(images: list[CocoImage], category_ids: list[int], class_to_idx: Mapping[str, int]) -> dict[str, Any]:
    """The kept images and boxes as a clean COCO dict (what mAP is computed against)."""
    names = names_by_index(class_to_idx)
    annotations = []
    for image in images:
        for (x1, y1, x2, y2), label in zip(image.boxes, image.labels, strict=True):
            (w, h) = (x2 - x1, y2 - y1)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image.image_id,
                    "category_id": category_ids[label],
                    "bbox": [x1, y1, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )

    return {
        "info": {},
        "licenses": [],
        "images": [{"id": im.image_id, "height": im.height, "width": im.width} for im in images],
        "annotations": annotations,
        "categories": [{"id": category_ids[idx], "name": name} for idx, name in enumerate(names)],
    }


# Datasets


def detection_train_transform(
    size: tuple[int, int], rgb_stats: Mapping[str, Sequence[float]], scale_range: tuple[float, float], hflip: float
) -> Callable[..., Any]:
    """Box-aware augmentation: flip, scale jitter, then a random ``size`` crop (padded when smaller), boxes cut by
    the crop clipped and dropped when under 2 px."""
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(p=hflip),
            v2.ScaleJitter(target_size=size, scale_range=scale_range, antialias=True),
            v2.RandomCrop(size, pad_if_needed=True),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=2.0),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(rgb_stats["mean"]), std=list(rgb_stats["std"])),
        ]
    )


class DetectionSample(NamedTuple):
    index: int
    image: torch.Tensor | None  # [C, H, W] normalised; None: unreadable (evaluation drops it)
    target: dict[str, torch.Tensor]  # boxes [N, 4] xyxy in the transformed image, labels [N]
    original_size: tuple[int, int]  # (height, width) of the photo, to map evaluation boxes back
    unreadable: tuple[str, ...]


class DetectionBatch(NamedTuple):
    """What the trainer's loop reads (``indices``, ``images``, ``targets``, ``unreadable``), plus the sizes."""

    indices: torch.Tensor
    images: torch.Tensor | list[torch.Tensor]  # stacked in training (fixed size), a list in evaluation
    targets: list[dict[str, torch.Tensor]]
    unreadable: list[str]
    original_sizes: list[tuple[int, int]]
    dropped: list[int]  # indices of the unreadable images dropped (evaluation)


class DetectionDataset(Dataset):
    """Images and boxes of a :class:`CocoData`, augmented (training) or only normalised (``train=False``).

    As :class:`birder.data.training.ImageDataset`: augmentation is seeded by ``(seed, epoch, image)``, and an
    unreadable image is replaced by the next readable one in training, dropped in evaluation.
    """

    def __init__(self, images: Sequence[CocoImage], transform: Callable[..., Any], *, train: bool, seed: int = 0):
        (self.images, self.transform, self.train, self.seed) = (list(images), transform, train, seed)
        self.paths = [entry.path for entry in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: SampleKey) -> DetectionSample:
        (epoch, index) = key if isinstance(key, tuple) else (None, key)
        (position, photo, unreadable) = load_readable(self.paths, index, replace=self.train)
        entry = self.images[position]
        if photo is None:
            return DetectionSample(index, None, {}, (entry.height, entry.width), unreadable)

        (image, target) = self._transform(photo, entry, epoch)
        return DetectionSample(index, image, target, (photo.height, photo.width), unreadable)

    def _transform(self, photo: Image.Image, entry: CocoImage, epoch: int | None) -> tuple[torch.Tensor, dict]:
        if not self.train:
            return (self.transform(photo), {})

        boxes = tv_tensors.BoundingBoxes(
            torch.tensor(entry.boxes, dtype=torch.float32).reshape(-1, 4),
            format="XYXY",
            canvas_size=(photo.height, photo.width),
        )
        target = {"boxes": boxes, "labels": torch.tensor(entry.labels, dtype=torch.int64)}
        with sample_seed(self.seed, epoch, entry.image_id):
            (image, target) = self.transform(tv_tensors.Image(v2.functional.pil_to_tensor(photo)), target)
        return (
            image.as_subclass(torch.Tensor),
            {"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"]},
        )


def collate_detection(samples: Sequence[DetectionSample]) -> DetectionBatch:
    kept = [sample for sample in samples if sample.image is not None]
    images: torch.Tensor | list[torch.Tensor] = [sample.image for sample in kept]
    if kept and all(image.shape == images[0].shape for image in images):
        images = torch.stack(images)
    return DetectionBatch(
        torch.tensor([sample.index for sample in kept], dtype=torch.long),
        images,
        [sample.target for sample in kept],
        [message for sample in samples for message in sample.unreadable],
        [sample.original_size for sample in kept],
        [sample.index for sample in samples if sample.image is None],
    )


def evaluation_dataset(
    data: CocoData, size: tuple[int, int], rgb_stats: Mapping[str, Sequence[float]]
) -> DetectionDataset:
    """The photos as inference sees them (:func:`birder.data.transforms.detection_transform`)."""
    return DetectionDataset(data.images, detection_transform(size, rgb_stats), train=False)
