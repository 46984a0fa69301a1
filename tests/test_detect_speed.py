"""``birder-predict --detector`` fast, with its answers kept: reduced-scale decoding (``--decode reduced``, the
default) against the reference full decode (``--decode full``), crops batched across photos for the classifier,
the detector in the run's dtype, and where the time goes (``run.json``'s ``stages``, the summary's line).

Photos are generated 1600 x 1200 JPEGs with texture (decoded at 1/8 for the 128 px detector); the detector is a seeded
tiny Faster R-CNN whose scores are spread out (tests/test_detector_dtype.py), the classifier the tiny one of the
classification tests.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from detect_support import BOXES_PER_PHOTO, save_tiny_detector
from PIL import Image
from test_detector_dtype import seeded_faster_rcnn
from test_images_reduced import textured
from test_predict import BAD_PHOTOS, GOOD_PHOTOS, exif_with_date_and_gps, make_photo_folder, save_tiny_model
from torchvision.ops import box_iou

from birder.inference import predictor as P
from birder.inference.crops import crop_box
from birder.inference.optimize import DTYPE_ENV
from birder.io.checkpoint import ModelInfo, make_signature
from birder.io.images import load_image
from birder.net.detection.checkpoint import save_detector
from birder.runs import detect as D
from birder.runs.stages import STAGES
from birder.scripts.predict import main

DETECTOR_CLASSES = ("bird", "mammal", "reptile")
# The seeded detector's best boxes: well above the rest (its scores are spread out)
THRESHOLD = "0.9"
BOX_COLUMNS = ("x1", "y1", "x2", "y2")


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    info = ModelInfo(
        {name: i for (i, name) in enumerate(DETECTOR_CLASSES)},
        make_signature(3, (128, 128), len(DETECTOR_CLASSES)),
        {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)},
    )
    return {
        "detector": save_detector(seeded_faster_rcnn(), folder / "det.pt", info),
        "classifier": save_tiny_model(folder / "tiny.pt"),
    }


def _run(models: dict[str, Path], photos: Path, output: Path, *extra: str) -> int:
    args = ["--weights", str(models["classifier"]), "--detector", str(models["detector"]), str(photos)]
    return main([*args, "-j", "0", "--no-progress", "--det-threshold", THRESHOLD, "--output-dir", str(output), *extra])


def _boxes(rows: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    found: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        found.setdefault(row["path"], [])
        if row["source"] == "detection":
            found[row["path"]].append(row)
    return found


def _kept(reference: list[dict[str, str]], candidate: list[dict[str, str]]) -> tuple[int, int, int]:
    """``(boxes of reference, those found in candidate at IoU >= 0.9 with the detector's class, those of them with
    the same species)``: each reference box against the candidate's boxes of the same photo."""
    (total, matched, same_species) = (0, 0, 0)
    candidates = _boxes(candidate)
    for path, mine in _boxes(reference).items():
        total += len(mine)
        theirs = candidates.get(path, [])
        if not mine or not theirs:
            continue
        iou = box_iou(
            torch.tensor([[float(row[k]) for k in BOX_COLUMNS] for row in mine]),
            torch.tensor([[float(row[k]) for k in BOX_COLUMNS] for row in theirs]),
        )
        for number, row in enumerate(mine):
            best = int(iou[number].argmax())
            if float(iou[number, best]) >= 0.9 and theirs[best]["det_class"] == row["det_class"]:
                matched += 1
                same_species += theirs[best]["top1_class"] == row["top1_class"]
    return (total, matched, same_species)


def test_reduced_decoding_keeps_the_boxes_and_the_species(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for seed in range(10):
        textured(seed).save(photos / f"camera_{seed:02d}.jpg", quality=90)
    assert _run(models, photos, tmp_path / "full", "--decode", "full") == 0

    # Crops too small in the 1/8 decode for the classifier's 32 x 48 come from one more decode of their photo
    second_decodes: list[int] = []
    original = D.load_image_reduced

    def counted(path: Path, *args: object, **kwargs: int) -> object:
        second_decodes.append(kwargs["max_reduction"])
        return original(path, *args, **kwargs)

    monkeypatch.setattr(D, "load_image_reduced", counted)
    assert _run(models, photos, tmp_path / "reduced") == 0

    (full, reduced) = (_read_csv(tmp_path / "full" / "results.csv"), _read_csv(tmp_path / "reduced" / "results.csv"))
    (total, matched, same_species) = _kept(full, reduced)
    assert total >= 30  # enough boxes for the shares to mean something
    assert matched >= 0.98 * total and same_species >= 0.99 * matched
    assert _kept(reduced, full)[1] >= 0.98 * len([row for row in reduced if row["source"] == "detection"])
    # Sizes in full-resolution pixels, as the full decode says
    sizes = {row["path"]: (row["width"], row["height"]) for row in _read_csv(tmp_path / "full" / "photos.csv")}
    assert {row["path"]: (row["width"], row["height"]) for row in _read_csv(tmp_path / "reduced" / "photos.csv")} == (
        sizes
    )
    assert set(sizes.values()) == {("1600", "1200")}
    # Boxes too small for the classifier in the 1/8 decode: one more decode of their photo, at the scale its
    # smallest box needs (1/2 mostly, full resolution for a box under 2 x 48 px); a photo whose boxes all have
    # the pixels at 1/8 has none
    assert second_decodes and any(reduction >= 2 for reduction in second_decodes)
    assert len(second_decodes) < len(sizes)

    run = json.loads((tmp_path / "reduced" / "run.json").read_text())
    assert run["settings"]["decode"] == run["decode"] == "reduced"
    assert json.loads((tmp_path / "full" / "run.json").read_text())["settings"]["decode"] == "full"


def test_a_mixed_folder_gives_the_boxes_of_the_full_decode(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    textured(20).save(photos / "large.jpg", quality=90)
    textured(21, 1200, 900).save(photos / "large.png")
    textured(22).convert("CMYK").save(photos / "cmyk.jpg", quality=90)
    textured(23).save(photos / "progressive.jpg", quality=90, progressive=True)
    textured(24).save(photos / "rotated.jpg", quality=90, exif=exif_with_date_and_gps(orientation=6))
    data = (photos / "large.jpg").read_bytes()
    (photos / "broken.jpg").write_bytes(data[: len(data) // 3])
    crops_dir = tmp_path / "crops"

    assert _run(models, photos, tmp_path / "full", "--decode", "full") == 0
    assert (
        _run(models, photos, tmp_path / "reduced", "--save-crops", str(crops_dir), "--draw", str(tmp_path / "d")) == 0
    )
    printed = capsys.readouterr().out

    (full, reduced) = (_read_csv(tmp_path / "full" / "results.csv"), _read_csv(tmp_path / "reduced" / "results.csv"))
    # Every format's best box is the full decode's; of all boxes, a random detector's near-ties (boxes of close
    # scores overlapping each other) may swap one (the 98 % over many boxes: the test above)
    for path, boxes in _boxes(full).items():
        if boxes:
            assert _kept([boxes[0]], reduced)[1] == 1, path
    (total, matched, _) = _kept(full, reduced)
    assert total >= 10 and matched >= 0.9 * total
    assert [(row["path"], row["width"], row["height"]) for row in _read_csv(tmp_path / "reduced" / "photos.csv")] == [
        (row["path"], row["width"], row["height"]) for row in _read_csv(tmp_path / "full" / "photos.csv")
    ]
    sizes = {
        Path(row["path"]).name: (row["width"], row["height"]) for row in _read_csv(tmp_path / "full" / "photos.csv")
    }
    assert sizes["rotated.jpg"] == ("1200", "1600") and sizes["large.png"] == ("1200", "900")
    for name in ("full", "reduced"):
        (failure,) = _read_csv(tmp_path / name / "failures.csv")
        assert Path(failure["path"]).name == "broken.jpg"
    # --save-crops and --draw: from the full-resolution photo, as a full decode cuts them
    saved = sorted(crops_dir.iterdir())
    assert len(saved) == len([row for row in reduced if row["source"] == "detection"])
    for row in reduced:
        if row["source"] != "detection":
            continue
        (crop_file,) = [
            p
            for p in saved
            if p.name.startswith(Path(row["path"]).stem + "-") and p.name.endswith(f"_box{row['box']}.jpg")
        ]
        box = [float(row[k]) for k in BOX_COLUMNS]
        # The table's box is rounded to 0.01 px: an edge may land on the next pixel
        expected = crop_box(load_image(row["path"]), box, 0.1).size
        assert np.abs(np.subtract(Image.open(crop_file).size, expected)).max() <= 1
    assert {Image.open(p).size for p in (tmp_path / "d").iterdir()} == {(int(w), int(h)) for (w, h) in sizes.values()}

    # Where the time went: run.json and one line of the summary
    run = json.loads((tmp_path / "reduced" / "run.json").read_text())
    assert set(run["stages"]) == set(STAGES)
    assert all(stage["seconds"] >= 0.0 and 0.0 <= stage["share"] <= 1.0 for stage in run["stages"].values())
    assert run["stages"]["detector"]["seconds"] > 0 and run["stages"]["classifier"]["seconds"] > 0
    assert run["detector_dtype"] == run["settings"]["detector_dtype"] and run["detector_dtype_reason"]
    line = [line for line in printed.splitlines() if line.strip().startswith("stages")][-1]  # the reduced run's
    assert all(stage in line for stage in ("decode", "detector", "crops", "classifier", "decision", "writing"))
    assert any(line.strip().startswith("detector ") and "decode reduced" in line for line in printed.splitlines())


def test_crops_of_several_photos_fill_the_classifiers_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Photos with three boxes each among unreadable ones: a batch of photos holds fewer crops than a full batch
    photos = make_photo_folder(tmp_path / "photos")
    models = {"classifier": save_tiny_model(tmp_path / "tiny.pt"), "detector": save_tiny_detector(tmp_path / "det.pt")}
    sizes: list[int] = []
    original = P.Predictor.predict_tensor

    def recorded(self: P.Predictor, inputs: torch.Tensor) -> object:
        sizes.append(len(inputs))
        return original(self, inputs)

    monkeypatch.setattr(P.Predictor, "predict_tensor", recorded)
    args = ["--weights", str(models["classifier"]), "--detector", str(models["detector"]), str(photos), "-j", "0"]
    assert main([*args, "--no-progress", "-b", "4", "--output-dir", str(tmp_path / "out")]) == 0
    assert sum(sizes) == BOXES_PER_PHOTO * len(GOOD_PHOTOS)
    assert all(size == 4 for size in sizes[:-1]) and 1 <= sizes[-1] <= 4
    rows = _read_csv(tmp_path / "out" / "results.csv")
    assert len(rows) == BOXES_PER_PHOTO * len(GOOD_PHOTOS) and len(_read_csv(tmp_path / "out" / "failures.csv")) == len(
        BAD_PHOTOS
    )
    # The rows stay in photo order, each photo's boxes best first
    done = [row["path"] for row in _read_csv(tmp_path / "out" / "photos.csv")]
    assert [row["path"] for row in rows] == [path for path in done for _ in range(BOXES_PER_PHOTO)]
    assert [row["box"] for row in rows] == [str(number) for number in range(BOXES_PER_PHOTO)] * len(GOOD_PHOTOS)

    # No box anywhere: no classifier call at all
    sizes.clear()
    assert main([*args, "--no-progress", "--det-threshold", "0.95", "--output-dir", str(tmp_path / "none")]) == 0
    assert sizes == []


def test_photos_waiting_for_the_classifier_hold_no_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Photos wait in the crop queue until the classifier's batch is full: a full-resolution decode held by each of
    # them (36 MB a 12 MP photo) would grow with the batch size. Only --save-crops and --draw need it kept
    photos = make_photo_folder(tmp_path / "photos")
    models = {"classifier": save_tiny_model(tmp_path / "tiny.pt"), "detector": save_tiny_detector(tmp_path / "det.pt")}
    held: list[bool] = []
    original = D.CropQueue.add

    def recorded(self: D.CropQueue, photo: object) -> None:
        held.append(photo.photo is not None)  # type: ignore[attr-defined]
        original(self, photo)  # type: ignore[arg-type]

    monkeypatch.setattr(D.CropQueue, "add", recorded)
    args = ["--weights", str(models["classifier"]), "--detector", str(models["detector"]), str(photos), "-j", "0"]
    args += ["--no-progress", "--decode", "full", "-b", "64"]
    assert main([*args, "--output-dir", str(tmp_path / "out")]) == 0
    assert len(held) == len(GOOD_PHOTOS) and not any(held)
    held.clear()
    assert main([*args, "--output-dir", str(tmp_path / "drawn"), "--draw", str(tmp_path / "drawings")]) == 0
    assert len(held) == len(GOOD_PHOTOS) and all(held)
    assert len(list((tmp_path / "drawings").glob("*.jpg"))) == len(GOOD_PHOTOS)


def test_full_resolution_photos_come_a_few_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # --decode full (and a boxes file) keeps every photo of a loader batch at full resolution, 36 MB a 12 MP photo:
    # 32 of them in each batch in flight held 7.7 GB. Those runs load FULL_PHOTOS_PER_BATCH photos a batch, and the
    # classifier's batches still fill (its crops are queued across loader batches); reduced decoding keeps -b.
    photos = make_photo_folder(tmp_path / "photos")
    models = {"classifier": save_tiny_model(tmp_path / "tiny.pt"), "detector": save_tiny_detector(tmp_path / "det.pt")}
    (loaded, classified) = ([], [])
    (original_loader, original_predict) = (P.Predictor.loader, P.Predictor.predict_tensor)

    def loader(self: P.Predictor, *args: object, **kwargs: object) -> object:
        batches = list(original_loader(self, *args, **kwargs))
        loaded.extend(len(batch.indices) + len(batch.failures) for batch in batches)
        return batches

    def predict_tensor(self: P.Predictor, inputs: torch.Tensor) -> object:
        classified.append(len(inputs))
        return original_predict(self, inputs)

    monkeypatch.setattr(P.Predictor, "loader", loader)
    monkeypatch.setattr(P.Predictor, "predict_tensor", predict_tensor)
    args = ["--weights", str(models["classifier"]), "--detector", str(models["detector"]), str(photos), "-j", "0"]
    args += ["--no-progress", "-b", "8"]
    photo_count = len(GOOD_PHOTOS) + len(BAD_PHOTOS)
    assert main([*args, "--decode", "full", "--output-dir", str(tmp_path / "full")]) == 0
    assert max(loaded) == D.FULL_PHOTOS_PER_BATCH < 8 and sum(loaded) == photo_count
    crops = BOXES_PER_PHOTO * len(GOOD_PHOTOS)
    assert sum(classified) == crops and all(size == 8 for size in classified[:-1])
    (loaded, classified) = ([], [])
    assert main([*args, "--output-dir", str(tmp_path / "reduced")]) == 0
    assert max(loaded) == min(8, photo_count) and sum(loaded) == photo_count


def test_decode_is_a_detection_option_and_a_resume_keeps_it(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    textured(30).save(photos / "one.jpg", quality=90)
    assert main(["--weights", str(models["classifier"]), str(photos), "--decode", "full"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--decode" in error and "--detector" in error

    assert _run(models, photos, tmp_path / "out") == 0
    capsys.readouterr()
    assert _run(models, photos, tmp_path / "out", "--resume", "--decode", "full") == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "decode" in error


def test_the_detector_runs_in_the_runs_dtype(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DTYPE_ENV, raising=False)  # the tests pin float32: here the option decides
    photos = tmp_path / "photos"
    photos.mkdir()
    textured(40).save(photos / "one.jpg", quality=90)
    assert _run(models, photos, tmp_path / "auto") == 0
    assert _run(models, photos, tmp_path / "bf16", "--dtype", "bfloat16") == 0
    auto = json.loads((tmp_path / "auto" / "run.json").read_text())
    bf16 = json.loads((tmp_path / "bf16" / "run.json").read_text())
    # auto: as for the classifier (this machine's answer, whatever it is); asked for: bfloat16, said so
    assert (auto["detector_dtype"], auto["detector_dtype_reason"]) == (auto["dtype"], auto["dtype_reason"])
    assert bf16["detector_dtype"] == bf16["settings"]["detector_dtype"] == "bfloat16"
    assert bf16["detector_dtype_reason"] == bf16["dtype_reason"] == "asked for"


def test_a_classification_run_says_where_its_time_went(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    photos = make_photo_folder(tmp_path / "photos")
    args = ["--weights", str(models["classifier"]), str(photos), "-j", "0", "--no-progress"]
    assert main([*args, "--output-dir", str(tmp_path / "out")]) == 0
    stages = json.loads((tmp_path / "out" / "run.json").read_text())["stages"]
    assert {"decode", "classifier", "decision", "writing"} <= set(stages)
    assert stages["decode"]["seconds"] > 0 and stages["classifier"]["seconds"] > 0
    assert any(line.strip().startswith("stages") for line in capsys.readouterr().out.splitlines())


def test_crop_box_cuts_the_pixels_of_its_rectangle() -> None:
    pixels = np.arange(50 * 100 * 3, dtype=np.uint32).reshape(50, 100, 3) % 251
    photo = Image.fromarray(pixels.astype(np.uint8))
    cases = {
        # box, margin -> (left, top, right, bottom): truncated left/top, rounded right/bottom, clipped, >= 1 px
        ((10.7, 5.2, 30.4, 20.6), 0.0): (10, 5, 30, 21),
        ((10.0, 10.0, 30.0, 20.0), 0.5): (0, 5, 40, 25),
        ((90.0, 40.0, 100.0, 50.0), 1.0): (80, 30, 100, 50),
        ((99.6, 49.6, 99.9, 49.9), 0.0): (99, 49, 100, 50),
    }
    for (box, margin), (left, top, right, bottom) in cases.items():
        expected = np.asarray(photo)[top:bottom, left:right]
        assert np.array_equal(np.asarray(crop_box(photo, box, margin)), expected), box


def test_the_detect_run_benchmark_tiny(tmp_path: Path) -> None:
    from benchmarks import detect_run

    output = tmp_path / "detect_run.json"
    args = ["--tiny", "--workdir", str(tmp_path / "work"), "--workers", "0", "--threshold", "0.5"]
    report = detect_run.main([*args, "--output", str(output)])
    assert json.loads(output.read_text()) == json.loads(json.dumps(report))
    assert set(report["runs"]) == {"full -j 0", "reduced -j 0"} and report["machine"]["cpu_model"]
    for run in report["runs"].values():
        assert run["photos_per_hour"] > 0 and {"decode", "detector", "writing"} <= set(run["stages_s"])


def test_the_whole_image_fallback_of_a_reduced_decode_answers_as_the_full_one(
    models: dict[str, Path], tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for seed in range(4):
        textured(50 + seed).save(photos / f"empty_{seed}.jpg", quality=90)
    fallback = ["--det-threshold", "0.9999", "--fallback-whole-image"]
    assert _run(models, photos, tmp_path / "full", "--decode", "full", *fallback) == 0
    assert _run(models, photos, tmp_path / "reduced", *fallback) == 0
    (full, reduced) = (_read_csv(tmp_path / "full" / "results.csv"), _read_csv(tmp_path / "reduced" / "results.csv"))
    assert [row["source"] for row in reduced] == ["whole-image"] * 4
    assert [row["top1_class"] for row in reduced] == [row["top1_class"] for row in full]
    np.testing.assert_allclose(
        [float(row["top1_prob"]) for row in reduced], [float(row["top1_prob"]) for row in full], atol=0.02
    )
