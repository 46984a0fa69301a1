"""One rule for outputs (``birder.io.outputs``), and the commands that lost or mixed files before it.

A command never writes onto one of its inputs (another spelling, a symbolic link, a hard link of it); an output
folder that holds another run's results is refused unless ``--resume`` or ``--overwrite`` (which deletes that
run's files, and only those); a file output that exists is refused unless ``--overwrite``; a training run refuses
a folder with checkpoints unless ``--resume``.
"""

import csv
import json
import os
from pathlib import Path

import pytest
from conftest import TINY_VIT_CONFIG
from detect_support import save_tiny_detector
from test_predict import CLASSES, make_photo_folder, random_photo, save_tiny_model

from benchmarks.synthetic import make_class_folder, write_coco_scenes
from birder.errors import BirderError
from birder.io.outputs import (
    MANIFEST_FILE,
    OutputFolder,
    check_output_file,
    check_outside_photos,
    check_training_folder,
    prepare_output_folder,
    same_file,
)
from birder.scripts import calibrate as calibrate_script
from birder.scripts import evaluate as evaluate_script
from birder.scripts import index as index_script
from birder.scripts import predict as predict_script
from birder.scripts import prior as prior_script
from birder.scripts import train as train_script
from birder.scripts import train_det as train_det_script
from birder.scripts import train_mim as train_mim_script
from birder.tools.cli import main as tools_main

PATTERNS = ("results.csv", "run.json", ".partial/*", "features/*.safetensors")


def one_line_error(capsys: pytest.CaptureFixture, prog: str) -> str:
    """The command's error: its last stderr line (after any log lines), which must start with its name."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"{prog}") and ": error: " in err[-1], err
    assert not any("Traceback" in line for line in err)
    return err[-1]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes), the manifest aside."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILE
    }


# ---------------------------------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------------------------------


def test_an_input_under_another_name_a_symlink_or_a_hard_link_is_refused_even_with_overwrite(tmp_path: Path) -> None:
    records = tmp_path / "records.csv"
    records.write_text("species,lat,lon\n")
    (tmp_path / "link.csv").symlink_to(records)
    os.link(records, tmp_path / "hard.csv")
    (tmp_path / "sub").mkdir()
    for output in (records, tmp_path / "link.csv", tmp_path / "hard.csv", tmp_path / "sub" / ".." / "records.csv"):
        with pytest.raises(BirderError, match="is one of this command's inputs") as caught:
            check_output_file(output, inputs=[None, records], overwrite=True)
        assert "\n" not in str(caught.value) and str(output) in str(caught.value)
    assert same_file(tmp_path / "hard.csv", records) and not same_file(tmp_path / "other.csv", records)
    assert records.read_text() == "species,lat,lon\n"


def test_images_are_never_written_among_the_photos_a_command_reads(tmp_path: Path) -> None:
    """Crops or drawings in (or below) a folder of the photos would be read as photos by the next run over it."""
    photos = tmp_path / "photos"
    (photos / "site1").mkdir(parents=True)
    (photos / "site1" / "IMG_0001.JPG").write_bytes(b"a photo")
    (tmp_path / "linked").symlink_to(photos)
    refused = [
        (photos, [photos], "is the folder of the photos"),
        (photos / "crops", [photos], "is inside the folder of the photos"),
        (photos / "site1" / "drawn", [photos / "site1"], "is inside"),
        (tmp_path / "linked" / "crops", [photos], "is inside"),  # another spelling of the same folder
        (photos / "crops", [tmp_path / "linked"], "is inside"),
        (photos / "site1", [photos / "site1" / "IMG_0001.JPG"], "is the folder"),  # a photo stands for its folder
        (photos / "top.png", [photos], "is inside"),  # a file output (--plot)
    ]
    for output, inputs, message in refused:
        with pytest.raises(BirderError, match=message) as caught:
            check_outside_photos(output, [None, *inputs], "--save-crops")
        error = str(caught.value)
        assert "\n" not in error and str(output) in error and "--save-crops" in error
    # Beside the photos, above them, in a hidden folder (photo discovery never enters one), or with no such input
    for output, inputs in [
        (tmp_path / "crops", [photos]),
        (tmp_path, [photos / "site1"]),
        (photos / ".crops", [photos]),
        (photos / "crops", [tmp_path / "missing"]),
        (tmp_path / "photos-crops", [photos]),  # a name that starts the same is another folder
    ]:
        check_outside_photos(output, inputs, "--draw")


def test_a_file_that_exists_needs_overwrite_and_a_new_one_does_not(tmp_path: Path) -> None:
    (tmp_path / "prior.bpr").write_bytes(b"earlier")
    with pytest.raises(BirderError, match="already exists: add --overwrite to replace it"):
        check_output_file(tmp_path / "prior.bpr", option="-o")
    assert check_output_file(tmp_path / "prior.bpr", overwrite=True) == tmp_path / "prior.bpr"
    assert check_output_file(tmp_path / "new.bpr") == tmp_path / "new.bpr"
    with pytest.raises(BirderError, match="is a folder"):
        check_output_file(tmp_path, overwrite=True)


def test_overwrite_clears_the_earlier_runs_files_and_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "features").mkdir(parents=True)
    (out / "notes.txt").write_text("the user's")
    (out / "features" / "README").write_text("the user's too")
    first = prepare_output_folder(out, "birder-predict", PATTERNS)
    (out / "results.csv").write_text("first run")
    (out / "run.json").write_text("{}")
    (out / ".partial").mkdir()
    (out / ".partial" / "results.r0.a0.csv").write_text("journal")
    (out / "features" / "a-0123456789ab.safetensors").write_bytes(b"x")
    (out / "extra.png").write_bytes(b"named by no pattern, but recorded as written")
    first.finish()
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["complete"] and "results.csv" in manifest["files"] and "notes.txt" not in manifest["files"]
    manifest["files"].append("extra.png")  # e.g. a file the command no longer names
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))

    with pytest.raises(BirderError) as caught:
        prepare_output_folder(out, "birder-predict", PATTERNS)
    message = str(caught.value)
    assert "\n" not in message and str(out) in message and "add --resume" in message and "--overwrite" in message
    assert (out / "results.csv").read_text() == "first run"

    prepare_output_folder(out, "birder-predict", PATTERNS, overwrite=True)
    assert snapshot(out) == {"notes.txt": b"the user's", "features/README": b"the user's too"}
    assert not (out / ".partial").exists()  # emptied, so removed


def test_resume_keeps_the_earlier_files_and_an_interrupted_run_counts_too(tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_output_folder(out, "birder-predict", PATTERNS)
    (out / ".partial").mkdir()
    (out / ".partial" / "results.r0.a0.csv").write_text("journal")  # killed before finish(): nothing recorded
    with pytest.raises(BirderError, match="already holds the results of an earlier birder-predict run"):
        OutputFolder(out, "birder-predict", PATTERNS).check()
    with pytest.raises(BirderError, match="give one of them"):
        OutputFolder(out, "birder-predict", PATTERNS).check(resume=True, overwrite=True)
    with pytest.raises(BirderError, match="holds the results of birder-predict, not of birder-index build"):
        OutputFolder(out, "birder-index build", (".partial/*",)).check(resume=True)

    prepare_output_folder(out, "birder-predict", PATTERNS, resume=True)
    assert (out / ".partial" / "results.r0.a0.csv").read_text() == "journal"
    # A command without --resume says only what it has
    with pytest.raises(BirderError) as caught:
        OutputFolder(out, "birder-predict", PATTERNS, can_resume=False).check()
    assert "--resume" not in str(caught.value) and "add --overwrite" in str(caught.value)


def test_a_manifest_naming_files_outside_its_folder_deletes_nothing_there(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "precious.jpg").write_bytes(b"photo")
    content = {"format": "birder-outputs", "patterns": ["../*.jpg"], "files": ["../precious.jpg"], "command": "x"}
    (out / MANIFEST_FILE).write_text(json.dumps(content))
    prepare_output_folder(out, "birder-predict", PATTERNS, overwrite=True)
    assert (tmp_path / "precious.jpg").read_bytes() == b"photo"


def test_a_training_folder_with_checkpoints_needs_resume(tmp_path: Path) -> None:
    check_training_folder(tmp_path / "new", None)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").write_text("epoch\n")
    check_training_folder(tmp_path / "run", None)  # no checkpoint yet
    (tmp_path / "run" / "vit_b16_1_states.pt").write_bytes(b"state")
    with pytest.raises(BirderError, match=r"holds checkpoints of an earlier run .*add --resume"):
        check_training_folder(tmp_path / "run", None)
    check_training_folder(tmp_path / "run", "latest")


# ---------------------------------------------------------------------------------------------------------------------
# The cases: birder-index
# ---------------------------------------------------------------------------------------------------------------------


def test_index_duplicates_never_writes_onto_the_index_or_its_photos(tmp_path: Path, capsys) -> None:
    pytest.importorskip("faiss")
    from test_search import save_tiny_model as save_index_model

    photos = make_class_folder(tmp_path / "photos", [0, 9], per_class=3, size=48)
    model = save_index_model(tmp_path / "tiny.pt", seed=0)
    index = tmp_path / "index"
    build = ["build", str(photos), "--weights", str(model), "-o", str(index), "-j", "0", "--no-progress"]
    assert index_script.main(build) == 0
    before = snapshot(index)
    photo = next(photos.rglob("*.png"))
    photo_bytes = photo.read_bytes()
    capsys.readouterr()

    for output, extra in ((index / "index.json", []), (index / "photos.parquet", ["--overwrite"]), (photo, [])):
        argv = ["duplicates", "-o", str(index), "--output", str(output), *extra]
        assert index_script.main(argv) == 2
        assert "is one of this command's inputs" in one_line_error(capsys, "birder-index")
    # With --overwrite a photo of the index is still an input
    assert index_script.main(["duplicates", "-o", str(index), "--output", str(photo), "--overwrite"]) == 2
    assert str(photo) in one_line_error(capsys, "birder-index")
    assert snapshot(index) == before and photo.read_bytes() == photo_bytes
    assert index_script.main(["query", "--path-in-index", str(photo), "-o", str(index), "-k", "2"]) == 0

    # The default table: written once, then replaced only with --overwrite
    assert index_script.main(["duplicates", "-o", str(index)]) == 0
    assert index_script.main(["duplicates", "-o", str(index)]) == 2
    assert "duplicates.csv' already exists: add --overwrite" in one_line_error(capsys, "birder-index")
    assert index_script.main(["duplicates", "-o", str(index), "--overwrite"]) == 0

    # A build over an index: refused; with --overwrite the index is rebuilt and the user's file stays
    (index / "notes.txt").write_text("the user's")
    assert index_script.main(build) == 2
    assert "already holds an index" in one_line_error(capsys, "birder-index")
    assert index_script.main([*build, "--overwrite"]) == 0
    assert (index / "notes.txt").read_text() == "the user's" and (index / "index.json").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# The cases: birder-prior build
# ---------------------------------------------------------------------------------------------------------------------


def test_prior_build_never_writes_onto_its_model_or_records(tmp_path: Path, capsys) -> None:
    model = save_tiny_model(tmp_path / "model.pt")
    records = tmp_path / "records.csv"
    rows = "".join(f"{name},48.2,16.4,2023-05-14\n" for name in CLASSES)
    records.write_text("scientificName,decimalLatitude,decimalLongitude,eventDate\n" + rows)
    (model_bytes, records_bytes) = (model.read_bytes(), records.read_bytes())
    build = ["build", str(records), "--classes", str(model), "-o"]

    for output in (model, records):  # with --overwrite too: an input is never an output
        assert prior_script.main([*build, str(output), *(["--overwrite"] if output == records else [])]) == 2
        assert "is one of this command's inputs" in one_line_error(capsys, "birder-prior")
    assert model.read_bytes() == model_bytes and records.read_bytes() == records_bytes

    (tmp_path / "europe.bpr").write_bytes(b"an earlier prior")
    assert prior_script.main([*build, str(tmp_path / "europe.bpr")]) == 2
    assert "already exists: add --overwrite" in one_line_error(capsys, "birder-prior")
    assert (tmp_path / "europe.bpr").read_bytes() == b"an earlier prior"
    assert prior_script.main([*build, str(tmp_path / "europe.bpr"), "--overwrite"]) == 0
    assert (tmp_path / "europe.bpr").read_bytes() != b"an earlier prior"


# ---------------------------------------------------------------------------------------------------------------------
# The cases: birder-predict
# ---------------------------------------------------------------------------------------------------------------------


def _predict_args(model: Path, photos: Path, out: Path, *extra: str) -> list[str]:
    return ["--weights", str(model), str(photos), "--output-dir", str(out), "-j", "0", "--no-progress", *extra]


def _weights_of(out: Path) -> str:
    return json.loads((out / "run.json").read_text())["settings"]["weights"]


def test_predict_never_mixes_two_models_in_one_folder(tmp_path: Path, capsys) -> None:
    photos = make_photo_folder(tmp_path / "photos")
    (first, second) = (save_tiny_model(tmp_path / "a.pt", seed=0), save_tiny_model(tmp_path / "b.pt", seed=1))
    out = tmp_path / "out"
    assert predict_script.main(_predict_args(first, photos, out, "--save-probabilities", "--export", "coco-ct")) == 0
    (out / "notes.txt").write_text("the user's")
    before = snapshot(out)
    assert {"results.csv", "probabilities.csv", "coco-ct.json", "run.json"} <= set(before)
    capsys.readouterr()

    # Another model, no --resume: refused, nothing touched
    assert predict_script.main(_predict_args(second, photos, out)) == 2
    error = one_line_error(capsys, "birder-predict")
    assert str(out) in error and "add --resume to continue it or --overwrite to replace it" in error
    assert snapshot(out) == before
    # --resume with another model: the run's own settings check refuses it
    assert predict_script.main(_predict_args(second, photos, out, "--resume")) == 2
    assert "other settings" in one_line_error(capsys, "birder-predict")

    # The exports of a results folder follow the same rule
    assert tools_main(["export", str(out), "--export", "coco-ct"]) == 2
    assert "coco-ct.json' already exists: add --overwrite" in one_line_error(capsys, "python -m birder.tools export")
    assert tools_main(["export", str(out), "--export", "coco-ct", "--overwrite"]) == 0

    # --overwrite: the first run's files go (those this run does not write too), the user's stay
    assert predict_script.main(_predict_args(second, photos, out, "--overwrite")) == 0
    after = snapshot(out)
    assert "probabilities.csv" not in after and "coco-ct.json" not in after
    assert after["notes.txt"] == b"the user's" and _weights_of(out) == os.path.abspath(second)
    with open(out / "results.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) > 0


def test_predict_with_a_detector_never_mixes_two_runs_in_one_folder(tmp_path: Path, capsys) -> None:
    photos = make_photo_folder(tmp_path / "photos")
    (model, detector) = (save_tiny_model(tmp_path / "tiny.pt"), save_tiny_detector(tmp_path / "det.pt"))
    out = tmp_path / "out"
    det = ["--detector", str(detector)]
    assert predict_script.main(_predict_args(model, photos, out, *det, "--export", "md-json")) == 0
    before = snapshot(out)
    assert {"results.csv", "photos.csv", "megadetector.json"} <= set(before)
    capsys.readouterr()

    assert predict_script.main(_predict_args(model, photos, out, *det, "--det-threshold", "0.9")) == 2
    assert "add --resume to continue it or --overwrite" in one_line_error(capsys, "birder-predict")
    assert snapshot(out) == before
    # The folders of drawings and crops follow the same rule
    drawn = tmp_path / "drawn"
    drawn.mkdir()
    (drawn / "holiday.jpg").write_bytes(b"the user's photo")
    assert predict_script.main(_predict_args(model, photos, tmp_path / "o2", *det, "--draw", str(drawn))) == 0
    drawings = snapshot(drawn)
    assert predict_script.main(_predict_args(model, photos, tmp_path / "o3", *det, "--draw", str(drawn))) == 2
    assert "--draw" in one_line_error(capsys, "birder-predict") and snapshot(drawn) == drawings
    argv = _predict_args(model, photos, tmp_path / "o3", *det, "--draw", str(drawn), "--overwrite")
    assert predict_script.main(argv) == 0 and snapshot(drawn) == drawings  # the same drawings again
    assert (drawn / "holiday.jpg").read_bytes() == b"the user's photo"

    assert predict_script.main(_predict_args(model, photos, out, *det, "--det-threshold", "0.9", "--overwrite")) == 0
    assert not (out / "megadetector.json").exists()
    assert json.loads((out / "run.json").read_text())["settings"]["det_threshold"] == 0.9


def test_predict_and_crops_never_write_images_among_the_photos(tmp_path: Path, capsys) -> None:
    photos = make_photo_folder(tmp_path / "photos")
    (model, detector) = (save_tiny_model(tmp_path / "tiny.pt"), save_tiny_detector(tmp_path / "det.pt"))
    before = snapshot(photos)
    det = ["--detector", str(detector)]
    for extra in (
        [*det, "--save-crops", str(photos)],
        [*det, "--draw", str(photos / "drawn")],
        ["--explain", str(photos / "Species A")],
        ["--plot", str(photos / "top.png")],
    ):
        assert predict_script.main(_predict_args(model, photos, tmp_path / "out", *extra)) == 2, extra
        assert "the images written there would be read as photos" in one_line_error(capsys, "birder-predict")
        assert snapshot(photos) == before and not (tmp_path / "out").exists()
    # Photos listed in a manifest: their folders are the photos' folders too
    listed = tmp_path / "photos.txt"
    listed.write_text("\n".join(str(path) for path in sorted(photos.rglob("*.jpg"))) + "\n")
    manifest_args = ["--weights", str(model), "--manifest", str(listed), "-j", "0", "--no-progress", *det]
    drawn = photos / "Species A" / "drawn"  # below a listed photo's folder
    assert predict_script.main([*manifest_args, "--output-dir", str(tmp_path / "out"), "--draw", str(drawn)]) == 2
    assert "the images written there would be read as photos" in one_line_error(capsys, "birder-predict")
    assert snapshot(photos) == before and not (tmp_path / "out").exists()
    # A hidden folder below the photos is never searched for photos: allowed
    assert predict_script.main(_predict_args(model, photos, tmp_path / "out", *det, "--draw", str(photos / ".d"))) == 0
    assert any((photos / ".d").iterdir())
    assert {name for name in snapshot(photos) if not name.startswith(".d/")} == set(before)

    # The crops tool: its crops folder inside the survey's photos is refused too
    survey = write_coco_scenes(tmp_path / "survey", 4, seed=1, size=(64, 64), classes=[0, 1], num_objects=(1, 2))
    survey_files = snapshot(survey.parent)
    assert tools_main(["crops", str(survey), "-o", str(survey.parent / "crops"), "--split", "1,0,0"]) == 2
    assert "would be read as photos" in one_line_error(capsys, "python -m birder.tools crops")
    assert snapshot(survey.parent) == survey_files


# ---------------------------------------------------------------------------------------------------------------------
# The cases: training runs
# ---------------------------------------------------------------------------------------------------------------------


def _earlier_checkpoint(folder: Path, name: str) -> bytes:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"the earlier run's checkpoint")
    return (folder / name).read_bytes()


def test_train_det_refuses_a_folder_with_checkpoints_without_resume(tmp_path: Path, capsys) -> None:
    train_json = write_coco_scenes(tmp_path / "train", 4, seed=1, size=(64, 64), classes=[0, 1], num_objects=(1, 2))
    run = tmp_path / "run"
    kept = _earlier_checkpoint(run, "retinanet_vit_t16_1.pt")
    args = ["--network", "retinanet", "--backbone", "vit_t16", "--backbone-config", json.dumps(TINY_VIT_CONFIG)]
    args += ["--model-config", json.dumps({"fpn_channels": 16, "anchor_sizes": [16, 32, 64, 128]})]
    args += ["--train-json", str(train_json), "--val-json", str(train_json), "--output-dir", str(run)]
    args += ["--size", "64", "--epochs", "1", "--batch-size", "2", "--workers", "0", "--no-progress"]
    assert train_det_script.main(args) == 2
    error = one_line_error(capsys, "birder-train-det")
    assert str(run) in error and "retinanet_vit_t16_1.pt" in error and "add --resume" in error
    assert (run / "retinanet_vit_t16_1.pt").read_bytes() == kept


def test_train_and_train_mim_refuse_a_folder_with_checkpoints_without_resume(tmp_path: Path, capsys) -> None:
    from test_training_data import make_image_folder, make_split_dataset

    data = make_split_dataset(tmp_path / "birds", train_per_class=2, val_per_class=1, classes=2)
    model = ["--network", "vit_b16", "--model-config", json.dumps({**TINY_VIT_CONFIG, "patch_size": 8})]
    common = ["--size", "32", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--no-progress"]
    run = tmp_path / "run"
    kept = _earlier_checkpoint(run, "vit_b16_1.pt")
    assert train_script.main(["--data-dir", str(data), *model, *common, "--output-dir", str(run)]) == 2
    assert "vit_b16_1.pt" in one_line_error(capsys, "birder-train")
    assert (run / "vit_b16_1.pt").read_bytes() == kept
    # --resume finds no state of this network there: it does not start afresh beside the other checkpoints
    other = ["--network", "vit_s16", "--model-config", json.dumps({**TINY_VIT_CONFIG, "patch_size": 8})]
    argv = ["--data-dir", str(data), *other, *common, "--output-dir", str(run), "--resume"]
    assert train_script.main(argv) == 2
    assert "holds no training state of vit_s16" in one_line_error(capsys, "birder-train")
    assert (run / "vit_b16_1.pt").read_bytes() == kept

    photos = make_image_folder(tmp_path / "unlabelled", 2, classes=2)
    mim_run = tmp_path / "mim"
    kept = _earlier_checkpoint(mim_run, "mae_vit_vit_b16_1.pt")
    mim = ["--data-dir", str(photos), *model, "--output-dir", str(mim_run), *common]
    assert train_mim_script.main(mim) == 2
    assert "add --resume" in one_line_error(capsys, "birder-train-mim")
    assert (mim_run / "mae_vit_vit_b16_1.pt").read_bytes() == kept

    # A run inside the images it trains on: its pictures (confusion matrix, reconstructions) would be a class of
    # their own, or unlabelled images, in the next run. Refused before anything is written; beside train/ and val/
    # in --data-dir is fine (only those two are read)
    for script, argv in (
        (train_script, ["--data-dir", str(data), *model, *common, "--output-dir", str(data / "train" / "run")]),
        (
            train_script,
            [
                "--train-dir",
                str(data / "train"),
                "--val-dir",
                str(data / "val"),
                *model,
                *common,
                "--output-dir",
                str(data / "val" / "run"),
            ],
        ),
        (train_mim_script, ["--data-dir", str(photos), *model, *common, "--output-dir", str(photos / "run")]),
    ):
        before = snapshot(tmp_path)
        assert script.main(argv) == 2
        assert "would be read as photos" in capsys.readouterr().err
        assert snapshot(tmp_path) == before
    assert train_script.main(["--data-dir", str(data), *model, *common, "--output-dir", str(data / "runs")]) == 0
    assert list((data / "runs").glob("*.pt"))


# ---------------------------------------------------------------------------------------------------------------------
# The other commands that write
# ---------------------------------------------------------------------------------------------------------------------


def test_calibrate_and_eval_outputs_follow_the_rule(tmp_path: Path, capsys) -> None:
    model = save_tiny_model(tmp_path / "model.pt")
    photos = tmp_path / "val"
    for number, name in enumerate(CLASSES * 2):  # labelled photos: a folder per class of the model
        (photos / name).mkdir(parents=True, exist_ok=True)
        random_photo(number).save(photos / name / f"{number}.png")
    os.link(model, tmp_path / "same-model.pt")
    (tmp_path / "calibrated.pt").write_bytes(b"an earlier calibration")
    base = ["--weights", str(model), "--val", str(photos), "-j", "0", "--no-progress", "-o"]
    assert calibrate_script.main([*base, str(tmp_path / "calibrated.pt")]) == 2
    assert "already exists: add --overwrite" in one_line_error(capsys, "birder-calibrate")
    assert calibrate_script.main([*base, str(tmp_path / "same-model.pt"), "--overwrite"]) == 2
    assert "the output must be a new file" in one_line_error(capsys, "birder-calibrate")
    assert (tmp_path / "calibrated.pt").read_bytes() == b"an earlier calibration"

    report = tmp_path / "report"
    report.mkdir()
    (report / "confusion_matrix.csv").write_text("an earlier report")
    argv = [str(model), str(photos), "--workers", "0", "--no-progress", "--output-dir", str(report)]
    assert evaluate_script.main(argv) == 2
    assert "add --overwrite" in one_line_error(capsys, "birder-eval")
    assert (report / "confusion_matrix.csv").read_text() == "an earlier report"
    # A report among the labelled photos: its pictures would be a class of their own in the next evaluation
    inside = [str(model), str(photos), "--workers", "0", "--no-progress", "--output-dir", str(photos / "report")]
    assert evaluate_script.main(inside) == 2
    assert "would be read as photos" in one_line_error(capsys, "birder-eval") and not (photos / "report").exists()


def test_a_teacher_cache_is_never_written_onto_the_teacher_or_another_file(tmp_path: Path) -> None:
    from test_training_classification import tiny_config
    from test_training_data import make_split_dataset

    from birder.training.classification import train_classifier

    data = make_split_dataset(tmp_path / "birds", train_per_class=2, val_per_class=1, classes=2)
    teacher = train_classifier(tiny_config(data, tmp_path / "teacher", epochs=1)).model_path
    teacher_bytes = teacher.read_bytes()
    common = {"epochs": 1, "aug_level": 0, "teacher": teacher}
    with pytest.raises(BirderError, match=r"--teacher-cache .* is one of this command's inputs"):
        train_classifier(tiny_config(data, tmp_path / "student", teacher_cache=teacher, **common))
    assert teacher.read_bytes() == teacher_bytes

    (tmp_path / "notes.pt").write_bytes(b"the user's, not teacher logits")
    with pytest.raises(BirderError, match="holds no teacher logits: choose another file"):
        train_classifier(tiny_config(data, tmp_path / "student2", teacher_cache=tmp_path / "notes.pt", **common))
    assert (tmp_path / "notes.pt").read_bytes() == b"the user's, not teacher logits"
