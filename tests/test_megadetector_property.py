"""Property tests of the MegaDetector batch-output reader users feed to ``python -m birder.tools crops``.

Whatever JSON a user hands over, the reader either reads it or refuses it with one line (a BirderError), never a
traceback; a well-formed output gives back exactly the animal detections at or above the threshold.
"""

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from birder.errors import BirderError
from birder.tools.crops import read_annotations

SETTINGS = settings(
    derandomize=True, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
LEFT_OUT = ("person", "vehicle", "empty")
PHOTOS = ["cam1/a.jpg", "cam1/b.jpg", "cam2/c.jpg"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


def _labels(folder: Path) -> Path:
    path = folder / "labels.csv"
    path.write_text("path,label\n" + "".join(f"{photo},fox\n" for photo in PHOTOS), encoding="utf-8")
    return path


@SETTINGS
@given(
    images=json_values,
    categories=json_values,
    info=json_values,
    detections=st.lists(
        st.dictionaries(st.sampled_from(["category", "conf", "bbox", "x"]), json_values, max_size=4), max_size=3
    ),
)
def test_any_megadetector_like_document_is_read_or_refused_in_one_line(
    tmp_path: Path, images: object, categories: object, info: object, detections: list
) -> None:
    labels = _labels(tmp_path)
    documents = [
        {"images": images, "detection_categories": categories, "info": info},
        {"images": [{"file": PHOTOS[0], "detections": detections}], "detection_categories": {"1": "animal"}},
    ]
    for number, document in enumerate(documents):
        path = tmp_path / f"md{number}.json"
        path.write_text(json.dumps(document), encoding="utf-8")
        try:
            read_annotations(path, labels, LEFT_OUT, None)
        except BirderError as err:
            assert "\n" not in str(err)


detection = st.fixed_dictionaries(
    {
        "category": st.sampled_from(["1", "2", "3"]),
        "conf": st.floats(0.0, 1.0),
        "bbox": st.tuples(st.floats(0.0, 0.8), st.floats(0.0, 0.8), st.floats(0.01, 0.2), st.floats(0.01, 0.2)),
    }
)


@SETTINGS
@given(per_photo=st.lists(st.lists(detection, max_size=4), min_size=3, max_size=3), threshold=st.floats(0.05, 0.95))
def test_well_formed_output_gives_back_the_animal_detections_above_the_threshold(
    tmp_path: Path, per_photo: list, threshold: float
) -> None:
    document = {
        "info": {"format_version": "1.4", "detector_metadata": {"typical_detection_threshold": 0.2}},
        "detection_categories": {"1": "animal", "2": "person", "3": "vehicle"},
        "images": [{"file": photo, "detections": found} for (photo, found) in zip(PHOTOS, per_photo, strict=True)],
    }
    path = tmp_path / "md.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    read = read_annotations(path, _labels(tmp_path), LEFT_OUT, threshold)
    expected = [
        (photo, tuple(d["bbox"]))
        for (photo, found) in zip(PHOTOS, per_photo, strict=True)
        for d in found
        if d["category"] == "1" and d["conf"] >= threshold
    ]
    assert [box.image for box in read.boxes] == [photo for (photo, _) in expected]
    for box, (_, xywh) in zip(read.boxes, expected, strict=True):
        assert box.xywh == pytest.approx(xywh) and box.normalised
    assert all(box.label == "fox" for box in read.boxes)
