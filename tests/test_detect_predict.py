"""``birder-predict --detector``: crop-then-classify, a row per box, the MegaDetector batch output, resume.

A tiny detector with known scores (tests/detect_support.py: three boxes per photo scoring 0.88) and a tiny
classifier run over the generated photo collection of the classification tests (good, EXIF-tagged and unreadable
photos). The rows must be what the library gives for each box: ``infer_image`` of the detector, ``crop_box`` with
the margin, the classifier's ``infer_image`` on the crop.
"""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from detect_support import BOX_SCORE, BOXES_PER_PHOTO, save_tiny_detector, tiny_detector
from test_predict import (
    BAD_PHOTOS,
    CLASSES,
    EXIF_LATITUDE,
    GOOD_PHOTOS,
    MODEL_SIZE,
    make_photo_folder,
    random_photo,
    save_tiny_model,
)
from test_predict_cli import _interrupt_after

import birder
from birder.inference.classification import infer_image as classify_image
from birder.inference.crops import crop_box
from birder.inference.detection import detection_transform
from birder.inference.detection import infer_image as detect_image
from birder.io import journal as J
from birder.io import table_files as T
from birder.io.images import load_image
from birder.scripts.predict import main

ROOT = Path(__file__).resolve().parents[1]
MARGIN = 0.2
TOP_K = 3


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    taxonomy = tmp_path / "taxonomy.csv"
    taxonomy.write_text("species,genus,family,order\n" + "".join(f"{name},Avis,Avidae,Aviformes\n" for name in CLASSES))
    return {
        "classifier": save_tiny_model(tmp_path / "tiny.pt"),
        "detector": save_tiny_detector(tmp_path / "det.pt"),
        "photos": make_photo_folder(tmp_path / "photos"),
        "taxonomy": taxonomy,
    }


def _args(setup: dict[str, Path], output: Path, *extra: str) -> list[str]:
    args = ["--weights", str(setup["classifier"]), "--detector", str(setup["detector"]), str(setup["photos"])]
    return [*args, "-j", "0", "--no-progress", "--top-k", str(TOP_K), "--output-dir", str(output), *extra]


def test_rows_per_box_are_the_librarys_crop_then_classify(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    extra = ["--crop-margin", str(MARGIN), "-b", "4", "--taxonomy", str(setup["taxonomy"]), "--min-prob", "0.99"]
    extra += ["--save-crops", str(tmp_path / "crops"), "--draw", str(tmp_path / "drawn")]
    assert main(_args(setup, out, *extra)) == 0
    printed = capsys.readouterr().out
    assert (
        f"Detected {BOXES_PER_PHOTO * len(GOOD_PHOTOS)} boxes in {len(GOOD_PHOTOS)} photos (0 without any)" in printed
    )
    assert f"{len(BAD_PHOTOS)} could not be read" in printed

    (det, det_info) = tiny_detector()
    (net, info) = birder.load_model(setup["classifier"], inference=True)
    transform = birder.classification_transform(MODEL_SIZE, info.rgb_stats)
    rows = _read_csv(out / "results.csv")
    assert len(rows) == BOXES_PER_PHOTO * len(GOOD_PHOTOS)
    photos_table = {row["path"]: row for row in _read_csv(out / "photos.csv")}
    crops = sorted(path.name for path in (tmp_path / "crops").iterdir())
    assert len(crops) == len(rows) and len(list((tmp_path / "drawn").iterdir())) == len(GOOD_PHOTOS)
    for name in GOOD_PHOTOS:
        path = setup["photos"] / name
        photo = load_image(path)
        mine = [row for row in rows if row["path"] == str(path)]
        assert photos_table[str(path)] == {
            "path": str(path),
            "width": str(photo.width),
            "height": str(photo.height),
            "detections": str(BOXES_PER_PHOTO),
        }
        found = detect_image(det, photo, detection_transform(det.size, det_info.rgb_stats), score_threshold=0.5)
        assert len(mine) == len(found.boxes) == BOXES_PER_PHOTO
        for number, (row, box) in enumerate(zip(mine, found.boxes.tolist(), strict=True)):
            assert (row["box"], row["detections"], row["source"], row["det_class"]) == (
                str(number),
                "3",
                "detection",
                "bird",
            )
            np.testing.assert_allclose([float(row[k]) for k in ("x1", "y1", "x2", "y2")], box, atol=0.006)
            assert float(row["det_score"]) == pytest.approx(BOX_SCORE, abs=1e-6)
            crop = crop_box(photo, box, MARGIN)
            (probs, _) = classify_image(net, crop, transform)
            order = np.argsort(-probs[0], kind="stable")[:TOP_K]
            assert [row[f"top{i + 1}_class"] for i in range(TOP_K)] == [CLASSES[i] for i in order]
            np.testing.assert_allclose(
                [float(row[f"top{i + 1}_prob"]) for i in range(TOP_K)], probs[0][order], atol=1e-5
            )
            # The decision order per box: no species reaches 0.99, so each falls back to the genus holding them all
            assert (row["label"], row["rank"], row["label_probability"]) == ("Avis", "genus", "1.000000")
            # --save-crops: the crop itself; --draw: the photo at its own size
            (crop_file,) = [c for c in crops if c.startswith(Path(name).stem + "-") and c.endswith(f"_box{number}.jpg")]
            assert load_image(tmp_path / "crops" / crop_file).size == crop.size
        if name == "Species C/rotated.jpg":
            assert all(float(row["gps_latitude"]) == pytest.approx(EXIF_LATITUDE, abs=1e-6) for row in mine)
    drawn = {load_image(p).size for p in (tmp_path / "drawn").iterdir()}
    assert drawn == {load_image(setup["photos"] / name).size for name in GOOD_PHOTOS}
    failures = _read_csv(out / "failures.csv")
    assert sorted(Path(row["path"]).relative_to(setup["photos"]).as_posix() for row in failures) == sorted(BAD_PHOTOS)


def test_photos_without_boxes_keep_a_row_or_the_whole_image_answer(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    taxonomy = ["--taxonomy", str(setup["taxonomy"])]
    assert main(_args(setup, tmp_path / "none", "--det-threshold", "0.95", *taxonomy)) == 0
    assert f"Detected 0 boxes in {len(GOOD_PHOTOS)} photos ({len(GOOD_PHOTOS)} without any)" in capsys.readouterr().out
    rows = _read_csv(tmp_path / "none" / "results.csv")
    assert len(rows) == len(GOOD_PHOTOS)
    for row in rows:
        assert row["detections"] == "0" and row["source"] == row["box"] == row["x1"] == row["det_score"] == ""
        assert row["prediction"] == row["top1_class"] == row["top1_prob"] == row["label"] == ""
    (rotated,) = [row for row in rows if row["path"].endswith("rotated.jpg")]
    assert float(rotated["gps_latitude"]) == pytest.approx(EXIF_LATITUDE, abs=1e-6)  # EXIF as for every row

    pa = pytest.importorskip("pyarrow.parquet")
    args = _args(setup, tmp_path / "whole", "--det-threshold", "0.95", "--fallback-whole-image", "--format", "parquet")
    assert main(args) == 0
    assert f"{len(GOOD_PHOTOS)} answered as whole images" in capsys.readouterr().out
    table = pa.read_table(tmp_path / "whole" / "results.parquet")
    assert str(table.schema.field("detections").type) == "int64"
    (net, info) = birder.load_model(setup["classifier"], inference=True)
    transform = birder.classification_transform(MODEL_SIZE, info.rgb_stats)
    for row in table.to_pylist():
        assert row["source"] == "whole-image" and row["detections"] == 0 and row["box"] is None
        (probs, _) = classify_image(net, row["path"], transform)
        assert row["top1_class"] == CLASSES[int(np.argmax(probs[0]))]
        assert row["top1_prob"] == pytest.approx(float(probs[0].max()), abs=1e-5)


def test_megadetector_batch_output_follows_the_standard(setup: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("jsonschema")
    from birder.geo.validate import validate_md_json

    out = tmp_path / "out"
    assert main(_args(setup, out, "--export", "md-json")) == 0
    path = out / "megadetector.json"
    assert validate_md_json(path) == []
    document = json.loads(path.read_text())
    assert document["info"]["format_version"] == "1.4" and document["info"]["detector"] == "det.pt"
    assert document["detection_categories"] == {"1": "bird"}
    assert document["classification_categories"] == {str(i): name for (i, name) in enumerate(CLASSES)}
    by_file = {image["file"]: image for image in document["images"]}
    assert set(by_file) == {*GOOD_PHOTOS, *BAD_PHOTOS}  # relative to the folder given, in its own separators
    for name in BAD_PHOTOS:
        # MegaDetector's format: a failure comes with "detections": null (its validator warns otherwise)
        assert set(by_file[name]) == {"file", "failure", "detections"} and by_file[name]["failure"]
        assert by_file[name]["detections"] is None

    rows = _read_csv(out / "results.csv")
    sizes = {row["path"]: (int(row["width"]), int(row["height"])) for row in _read_csv(out / "photos.csv")}
    for name in GOOD_PHOTOS:
        mine = [row for row in rows if row["path"] == str(setup["photos"] / name)]
        detections = by_file[name]["detections"]
        assert len(detections) == len(mine) == BOXES_PER_PHOTO
        (width, height) = sizes[mine[0]["path"]]
        for detection, row in zip(detections, mine, strict=True):
            (x1, y1, x2, y2) = (float(row[k]) for k in ("x1", "y1", "x2", "y2"))
            expected = [x1 / width, y1 / height, (x2 - x1) / width, (y2 - y1) / height]
            np.testing.assert_allclose(detection["bbox"], expected, atol=1e-4)
            assert detection["category"] == "1" and detection["conf"] == pytest.approx(BOX_SCORE, abs=1e-4)
            named = [
                (document["classification_categories"][cid], score) for (cid, score) in detection["classifications"]
            ]
            assert named == [
                (row[f"top{i + 1}_class"], pytest.approx(float(row[f"top{i + 1}_prob"]), abs=1e-4))
                for i in range(TOP_K)
            ]

    # Photos without a box are listed with no detections; the file stays valid
    assert main(_args(setup, tmp_path / "none", "--export", "md-json", "--det-threshold", "0.95")) == 0
    empty = json.loads((tmp_path / "none" / "megadetector.json").read_text())
    assert all(image["detections"] == (None if "failure" in image else []) for image in empty["images"])
    assert validate_md_json(tmp_path / "none" / "megadetector.json") == []


def test_resume_after_an_interruption_equals_an_uninterrupted_run(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    small = ["-b", "2", "--chunk-size", "1", "--export", "md-json"]  # 3 classifier calls per batch of 2 photos
    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 4)
        assert main(_args(setup, resumed, *small)) == 130
    assert "--resume" in capsys.readouterr().err and not (resumed / "results.csv").exists()
    journal = resumed / J.JOURNAL_DIR / "results.r0.a0.csv"
    committed = list(T.read_csv_table(journal)[1])
    done = {row[0] for row in T.read_csv_table(resumed / J.JOURNAL_DIR / "photos.r0.a0.csv")[1]}
    assert 1 <= len(done) < len(GOOD_PHOTOS)
    # A kill in the middle of a photo's boxes: one of its rows on disk, its photos row not
    undone = sorted(str(setup["photos"] / name) for name in GOOD_PHOTOS if str(setup["photos"] / name) not in done)
    with open(journal, "a", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerow([undone[-1], *committed[0][1:]])

    assert main([*_args(setup, resumed, *small), "--resume"]) == 0
    assert "Resuming:" in capsys.readouterr().err
    assert main(_args(setup, tmp_path / "straight", "--export", "md-json")) == 0
    for table in ("results", "photos", "failures"):
        got = _read_csv(resumed / f"{table}.csv")
        expected = _read_csv(tmp_path / "straight" / f"{table}.csv")
        assert [(r["path"], r.get("box")) for r in got] == [(r["path"], r.get("box")) for r in expected], table
        for a, b in zip(got, expected, strict=True):
            for key, value in a.items():
                if key.endswith(("_prob", "_score")) or key in ("x1", "y1", "x2", "y2"):
                    assert float(value) == pytest.approx(float(b[key]), abs=1e-5)
                elif key != "error":
                    assert value == b[key], key
    md = json.loads((resumed / "megadetector.json").read_text())
    assert sum(len(image["detections"] or []) for image in md["images"]) == BOXES_PER_PHOTO * len(GOOD_PHOTOS)


def test_the_merge_takes_an_inputs_rows_from_the_attempt_that_finished_it(tmp_path: Path) -> None:
    spec = T.TableSpec("results", T.string_columns("path", "box"))
    J.prepare_run(tmp_path, [spec], "csv", {}, resume=False)
    for attempt, rows in ((0, [["a", "0"], ["a", "1"], ["b", "0"]]), (1, [["b", "0"], ["b", "1"], ["c", "0"]])):
        writer = J.JournalWriter(tmp_path / J.JOURNAL_DIR / f"results.r0.a{attempt}.csv", spec)
        writer.add(rows)
        writer.close()
    written = J.finalize_run(tmp_path, [spec], "csv", {"a": 0, "b": 1, "c": 2}, include_final=False)
    assert list(T.read_csv_table(written["results"])[1]) == [["a", "0"], ["a", "1"], ["b", "0"], ["b", "1"], ["c", "0"]]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--detector", "{classifier}"], "not a detector file"),
        (["--detector", "{photos}/missing.pt"], "does not exist"),
        (["--detector", "{detector}", "--save-probabilities"], "--save-probabilities is not available with --detector"),
        # (--events and --export camtrap-dp / coco-ct work with a detector: tests/test_detect_chain.py)
        (["--detector", "{detector}", "--explain", "{photos}/x"], "--explain is not available with --detector"),
        (["--detector", "{detector}", "--crop-margin", "-1"], "--crop-margin must be a fraction >= 0"),
        (["--export", "md-json"], "--export md-json is about detected boxes: it needs --detector"),
        (["--save-crops", "crops"], "--save-crops is about detected boxes: it needs --detector"),
        (["--fallback-whole-image"], "it needs --detector"),
    ],
)
def test_bad_inputs_are_one_line(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], fragment: str
) -> None:
    extra = [item.format(**setup) for item in extra]
    args = ["--weights", str(setup["classifier"]), str(setup["photos"]), "-j", "0", "--no-progress", *extra]
    assert main([*args, "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("birder-predict: error: ") and error.count("\n") == 1 and fragment in error, error


def test_a_detector_given_as_the_classifier_is_one_line(setup: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    args = ["--weights", str(setup["detector"]), str(setup["photos"]), "-j", "0", "--no-progress"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "a detector file" in error and "--detector FILE" in error and error.count("\n") == 1


def _torchrun() -> list[str]:
    import shutil

    found = shutil.which("torchrun")
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(setup: dict[str, Path], tmp_path: Path) -> None:
    (setup["photos"] / "Species D").mkdir()
    for i in range(5):  # an odd number of good photos
        random_photo(300 + i).save(setup["photos"] / f"Species D/extra{i}.png")
    command = [*_torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "birder.scripts.predict"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [*command, *_args(setup, tmp_path / "dist", "-b", "2", "--export", "md-json")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        (stdout, stderr) = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert process.returncode == 0, stdout + stderr
    assert main(_args(setup, tmp_path / "single", "-b", "2")) == 0
    for table in ("results", "photos", "failures"):
        dist = _read_csv(tmp_path / "dist" / f"{table}.csv")
        single = _read_csv(tmp_path / "single" / f"{table}.csv")
        assert [(r["path"], r.get("box"), r.get("top1_class")) for r in dist] == [
            (r["path"], r.get("box"), r.get("top1_class")) for r in single
        ]
    assert len(_read_csv(tmp_path / "dist" / "results.csv")) == BOXES_PER_PHOTO * (len(GOOD_PHOTOS) + 5)
    assert (tmp_path / "dist" / "megadetector.json").is_file()
