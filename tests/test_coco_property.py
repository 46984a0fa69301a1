"""Property tests of the COCO reader (birder-train-det and birder-eval-det read every annotation file through it).

Arbitrary JSON-like documents, loosely shaped like COCO files or not at all, are read or refused with one line
(a :class:`~birder.errors.BirderError`), never another exception; whatever is read holds only finite boxes inside
their images. Well-formed generated files give back their boxes and categories.
"""

import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from birder.data.detection import read_coco
from birder.errors import BirderError

# Files the generated documents may name: two real photos, and names that are not there
SIZES = {"a.png": (40, 30), "b.png": (20, 50)}  # (width, height)
FILE_NAMES = [*SIZES, "missing.png", "", "sub/../a.png", "a.png/"]
# Deterministic (derandomized, no example database); the fixture is a folder of photos the examples only read
SETTINGS = settings(
    derandomize=True, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)
ids = st.integers(-2, 6) | st.sampled_from([1.0, 2.5, "3", "x", True, math.nan, math.inf]) | json_values
numbers = st.integers(-5, 60) | st.floats(-5, 60) | st.sampled_from([math.nan, math.inf, -math.inf, "7", True])
images = st.fixed_dictionaries(
    {},
    optional={
        "id": ids,
        "file_name": st.sampled_from(FILE_NAMES) | st.text(max_size=10) | json_values,
        "width": numbers | json_values,
        "height": numbers | json_values,
    },
)
annotations = st.fixed_dictionaries(
    {},
    optional={
        "id": ids,
        "image_id": ids,
        "category_id": ids,
        "bbox": st.lists(numbers, max_size=5) | json_values,
        "iscrowd": scalars,
    },
)
categories = st.fixed_dictionaries(
    {}, optional={"id": ids, "name": st.sampled_from(["bird", "cat", ""]) | st.text(max_size=6) | json_values}
)
# Shaped like a COCO file (lists of entries with COCO's keys, whose values may be anything), or loosely so
coco_like = st.fixed_dictionaries(
    {
        "images": st.lists(images | json_values, max_size=4),
        "categories": st.lists(categories | json_values, max_size=3),
    },
    optional={"annotations": st.lists(annotations | json_values, max_size=5), "info": json_values},
)
loosely_coco = st.fixed_dictionaries(
    {},
    optional={
        "images": st.lists(images, max_size=3) | json_values,
        "annotations": st.lists(annotations, max_size=3) | json_values,
        "categories": st.lists(categories, max_size=3) | json_values,
    },
)


def _flat(boxes) -> list[float]:
    return [value for box in boxes for value in box]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    for name, size in SIZES.items():
        Image.new("RGB", size, (90, 120, 60)).save(root / name)
    return root


def _read_or_refuse(path: Path, class_to_idx: dict[str, int] | None) -> None:
    """Read ``path``: either usable data (finite boxes inside their images) or one BirderError line."""
    try:
        data = read_coco(path, class_to_idx=class_to_idx)
    except BirderError as err:
        message = str(err)
        assert message and "\n" not in message and "Traceback" not in message
        return
    assert data.images
    for image in data.images:
        assert image.width > 0 and image.height > 0 and len(image.boxes) == len(image.labels)
        for x1, y1, x2, y2 in image.boxes:
            assert all(math.isfinite(v) for v in (x1, y1, x2, y2))
            assert 0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height
        assert all(0 <= label < len(data.class_to_idx) for label in image.labels)
    assert len({image.image_id for image in data.images}) == len(data.images)
    assert len(data.ground_truth["annotations"]) == data.num_boxes


@settings(SETTINGS, max_examples=150)
@given(document=coco_like | loosely_coco | json_values, known=st.sampled_from([None, {"bird": 0, "cat": 1}]))
def test_any_json_document_is_read_or_refused_in_one_line(
    photos: Path, document: object, known: dict[str, int] | None
) -> None:
    path = photos / "annotations.json"
    path.write_text(json.dumps(document), encoding="utf-8")  # NaN and Infinity as Python writes them
    _read_or_refuse(path, known)


@settings(SETTINGS, max_examples=100)
@given(content=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_any_bytes_are_read_or_refused_in_one_line(photos: Path, content: bytes) -> None:
    path = photos / "bytes.json"
    path.write_bytes(content)
    _read_or_refuse(path, None)


@st.composite
def well_formed(draw: st.DrawFn) -> dict:
    """A valid COCO document over the two photos: unique ids, boxes inside their images, some crowd regions."""
    category_ids = draw(st.lists(st.integers(0, 10**6), min_size=1, max_size=4, unique=True))
    names = draw(
        st.lists(
            st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=8),
            min_size=len(category_ids),
            max_size=len(category_ids),
            unique=True,
        )
    )
    image_ids = draw(st.lists(st.integers(-(10**9), 10**9), min_size=1, max_size=4, unique=True))
    coco: dict = {"images": [], "annotations": [], "categories": []}
    coco["categories"] = [{"id": cat_id, "name": name} for (cat_id, name) in zip(category_ids, names, strict=True)]
    for image_id in image_ids:
        file_name = draw(st.sampled_from(sorted(SIZES)))
        (width, height) = SIZES[file_name]
        entry = {"id": image_id, "file_name": file_name}
        if draw(st.booleans()):  # else read from the file's header
            entry.update(width=width, height=height)
        coco["images"].append(entry)
        for _ in range(draw(st.integers(0, 3))):
            x = draw(st.floats(0, width - 1, allow_subnormal=False))
            y = draw(st.floats(0, height - 1, allow_subnormal=False))
            w = draw(st.floats(0.5, width - x, allow_subnormal=False))
            h = draw(st.floats(0.5, height - y, allow_subnormal=False))
            annotation = {"id": len(coco["annotations"]) + 1, "image_id": image_id, "bbox": [x, y, w, h]}
            annotation.update(category_id=draw(st.sampled_from(category_ids)), iscrowd=int(draw(st.booleans())))
            coco["annotations"].append(annotation)
    return coco


@settings(SETTINGS, max_examples=80)
@given(document=well_formed())
def test_well_formed_files_give_back_their_boxes_and_categories(photos: Path, document: dict) -> None:
    path = photos / "well_formed.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    data = read_coco(path)

    assert data.problems == []
    ordered = sorted(document["categories"], key=lambda category: category["id"])
    assert data.class_to_idx == {category["name"]: index for (index, category) in enumerate(ordered)}
    assert data.category_ids == [category["id"] for category in ordered]
    assert data.ground_truth["categories"] == [{"id": c["id"], "name": c["name"]} for c in ordered]

    assert [image.image_id for image in data.images] == [entry["id"] for entry in document["images"]]
    objects = [ann for ann in document["annotations"] if not ann["iscrowd"]]  # crowd regions are not objects
    label_of = {category_id: index for (index, category_id) in enumerate(data.category_ids)}
    for image, entry in zip(data.images, document["images"], strict=True):
        assert (image.width, image.height) == SIZES[entry["file_name"]]
        mine = [ann for ann in objects if ann["image_id"] == entry["id"]]
        assert image.labels == [label_of[ann["category_id"]] for ann in mine]
        expected = [[x, y, x + w, y + h] for (x, y, w, h) in (ann["bbox"] for ann in mine)]
        assert _flat(image.boxes) == pytest.approx(_flat(expected), rel=1e-12, abs=1e-9)

    # The ground truth scored against: the same objects, image by image, as COCO boxes (x, y, width, height)
    truth = data.ground_truth["annotations"]
    by_image = [ann for image in data.images for ann in objects if ann["image_id"] == image.image_id]
    assert [(ann["image_id"], ann["category_id"]) for ann in truth] == [
        (ann["image_id"], ann["category_id"]) for ann in by_image
    ]
    assert _flat(ann["bbox"] for ann in truth) == pytest.approx(_flat(ann["bbox"] for ann in by_image), abs=1e-9)
