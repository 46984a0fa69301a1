"""The field-chain benchmark's distilled fast classifier (``benchmarks.field_chain``): the crops it is measured on
(cut from the benchmark photos' true boxes as ``birder-predict`` cuts a detection), the top-1 it reports, and the
teacher / label-only student / distilled student trained through ``birder-train`` (slow)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_vit
from PIL import Image

import birder
from benchmarks import field_chain
from benchmarks.synthetic import make_class_folder
from birder.io.images import crop_rectangle

NAMES = [field_chain.class_name(c) for c in field_chain.CLASSES]


def test_field_crops_are_the_true_boxes_with_the_margin_at_the_classifier_size(tmp_path: Path) -> None:
    # 1600 x 1200 photos: animals of 0.5-20 % of the frame, 98-620 px a side; a photo whose animals are all large
    # is decoded at a reduced scale, yet no crop is cut smaller than the classifier's input
    size = (1200, 1600)
    photos = tmp_path / "photos"
    truth = field_chain.make_field_set(photos, 9, seed=5, size=size)
    crops = field_chain.cut_field_crops(photos, truth, tmp_path / "crops")
    # crop file stem -> (photo, box, species)
    animals = {
        f"{key.replace('/', '_')}_{index}": (key, box, species)
        for key, item in truth["photos"].items()
        for index, (box, species) in enumerate(zip(item["boxes"], item["classes"], strict=True))
    }
    assert animals, "the set has animals"
    written = sorted(crops.glob("*/*.png"))
    assert sorted(path.stem for path in written) == sorted(animals)
    reduced = 0
    for path in written:
        (_, (x, y, w, h), species) = animals[path.stem]
        assert path.parent.name == species  # filed under its true species
        (left, top, right, bottom) = crop_rectangle((size[1], size[0]), [x, y, x + w, y + h], field_chain.CROP_MARGIN)
        with Image.open(path) as crop:
            (crop_w, crop_h) = crop.size
        scale = crop_w / (right - left)
        # cut from a DCT-scaled decode (1, 1/2, 1/4, 1/8 of the side), the same scale both ways (edges rounded)
        assert min(abs(scale - dct) for dct in (1.0, 0.5, 0.25, 0.125)) < 0.03
        assert abs(crop_h / (bottom - top) - scale) < 0.03
        assert min(crop_w, crop_h) >= field_chain.CLASSIFIER_SIZE
        reduced += scale < 0.99
    assert reduced > 0  # some photo was decoded at a reduced scale
    stamp = written[0].stat().st_mtime_ns
    assert field_chain.cut_field_crops(photos, truth, tmp_path / "crops") == crops
    assert written[0].stat().st_mtime_ns == stamp  # cut once per photo set


def test_crops_top1_counts_the_crops_of_the_class_a_model_names(tmp_path: Path) -> None:
    # A model that names disc_0 whatever it sees is right on exactly the disc_0 crops
    crops = make_class_folder(tmp_path / "crops", field_chain.CLASSES[:3], per_class=2, size=32, seed=0)
    make_class_folder(crops, field_chain.CLASSES[:1], per_class=4, size=32, seed=1)  # disc_0: 4 crops (0-3)
    net = make_tiny_vit(len(NAMES), size=(32, 32))
    with torch.no_grad():
        net.classifier.weight.zero_()
        net.classifier.bias.copy_(torch.tensor([5.0] + [0.0] * (len(NAMES) - 1)))
    stats = {"mean": (0.5,) * 3, "std": (0.25,) * 3}
    weights = birder.save_model(
        net, tmp_path / "one.pt", birder.ModelInfo({n: i for i, n in enumerate(NAMES)}, None, stats)
    )
    model = field_chain.load_classifier(weights)
    (top1, count) = field_chain.crops_top1(model, crops)
    assert count == 8 and top1 == pytest.approx(4 / 8)
    assert field_chain.crops_top1(model, tmp_path / "nothing") == (None, 0)


@pytest.mark.slow
def test_teacher_students_and_figures_through_birder_train(tmp_path: Path) -> None:
    # About 10 s (a minute on a loaded machine): three tiny classifiers by birder-train's main (the teacher larger
    # than the students), the distilled one with --teacher; a new distillation recipe retrains that student only
    training = dataclasses.replace(field_chain.SMALL_TRAINING, crops_per_class=4, classifier_epochs=1, teacher_epochs=1)
    models = field_chain.trained_classifiers(tmp_path, training, seed=0)
    assert {path.parent.name.split("_")[0] for path in (models["teacher"], models["student"])} == {"teacher", "student"}
    assert models["student"].parent != models["student_labels_only"].parent
    trained = {**{k: str(v) for k, v in models.items()}, "training": vars(training)}
    figures = field_chain.distillation_figures(trained, {"held_out": models["crops"] / "held_out"}, set())
    assert figures["teacher_parameters"] > 2 * figures["student_parameters"]
    row = figures["sets"]["held_out"]
    assert row["crops"] == len(field_chain.CLASSES) * 4 and row["role"] == "tuning"
    for column in ("teacher_top1", "student_top1", "student_labels_only_top1"):
        assert 0.0 <= row[column] <= 1.0
    if row["teacher_top1"]:
        assert row["student_over_teacher"] == pytest.approx(row["student_top1"] / row["teacher_top1"])
    stamps = {name: models[name].stat().st_mtime_ns for name in ("teacher", "student_labels_only")}
    again = field_chain.trained_classifiers(tmp_path, dataclasses.replace(training, distill_alpha=0.9), seed=0)
    assert again["student"] != models["student"] and again["student"].is_file()
    assert {name: again[name].stat().st_mtime_ns for name in stamps} == stamps  # reused, not retrained
    assert json.loads((models["crops"] / "done.json").read_text())["per_class"] == 4


def _fine_detail(path: Path) -> float:
    """Mean absolute difference of neighbouring pixels: the pixel noise and thin strokes a reduction averages away."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    return float(np.abs(np.diff(pixels, axis=1)).mean())


def test_detector_scenes_drawn_large_and_reduced_like_the_photos(tmp_path: Path) -> None:
    # Drawn at 8x the detector's input and reduced: the detector's input size, boxes in its pixels, and less of the
    # fine detail (the finest foliage, pixel noise) that a 12 MP photo reduced to the detector's input has lost
    # (here, mean neighbour difference: drawn at the input size 9.9, drawn at 8x 7.1, a reduced photo 5.6)
    (height, width) = field_chain.DETECTOR_SCENE
    reduced = json.loads(field_chain._field_scenes(tmp_path / "reduced", 2, seed=1, render_scale=8).read_text())
    plain = json.loads(field_chain._field_scenes(tmp_path / "plain", 2, seed=1).read_text())
    assert [(i["height"], i["width"]) for i in reduced["images"]] == [(height, width)] * 2
    assert reduced["annotations"], "the scenes have animals"
    for annotation in reduced["annotations"]:
        (x, y, w, h) = annotation["bbox"]
        assert x >= 0 and y >= 0 and x + w <= width and y + h <= height and w * h == pytest.approx(annotation["area"])
        assert 0.004 <= w * h / (height * width) <= 0.21  # 0.5-20 % of the frame, as in the photos
    for image in reduced["images"]:
        with Image.open(tmp_path / "reduced" / image["file_name"]) as scene:
            assert scene.size == (width, height)
    detail = [_fine_detail(tmp_path / "reduced" / image["file_name"]) for image in reduced["images"]]
    plain_detail = [_fine_detail(tmp_path / "plain" / image["file_name"]) for image in plain["images"]]
    assert max(detail) < 0.85 * min(plain_detail)


@pytest.mark.slow
def test_small_smoke_run_trains_the_pair_and_runs_the_chain(tmp_path: Path) -> None:
    # About 70 s: `--small` (the smoke run a user tries first) trains the teacher, both students and the detector
    # with SMALL_TRAINING's settings and runs the whole chain on 6 small photos, reduced and full decoding
    output = tmp_path / "field_chain.json"
    argv = ["--small", "--configs", "fast", "fast_full", "--photos", "6", "--photo-size", "300", "400"]
    assert field_chain.main([*argv, "--cache", str(tmp_path / "cache"), "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["configs"]["fast"]["returncode"] == 0 and report["configs"]["fast"]["answers"]["photos"] == 6
    assert "--decode full" in report["configs"]["fast_full"]["command"]
    # 400 x 300 photos for a 256 x 192 detector: no smaller DCT scale keeps its input, so both decodes are the same
    decoding = report["reduced_against_full_decode_boxes"]
    assert decoding["boxes"] == 0 or decoding["share_iou_at_least_0.9"] == 1.0
    assert decoding["boxes"] == 0 or decoding["share_species_changed"] == 0.0
    distillation = report["models"]["fast"]["distillation"]
    assert distillation["recipe"]["classifier_epochs"] == field_chain.SMALL_TRAINING.classifier_epochs
    assert len(distillation["sets"]) == 6
