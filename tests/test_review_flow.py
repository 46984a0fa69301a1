"""Decisions flow on: human observations in the Camtrap DP export, review-stats, birder-calibrate --val
reviews.csv, review-crops feeding birder-train --train-csv."""

import json
from pathlib import Path

import pytest
from review_support import CLASSES, copy_results, predict, read_csv, survey

from birder.geo.validate import validate_camtrap_dp
from birder.inference.tables import photo_file_stem
from birder.review.answers import camera_split, read_reviewed
from birder.review.session import ReviewSession
from birder.review.stats import review_stats, wilson_interval
from birder.scripts.calibrate import main as calibrate_main
from birder.scripts.train import main as train_main
from birder.tools.cli import main as tools_main


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from detect_support import save_tiny_detector

    tmp = tmp_path_factory.mktemp("review-flow")
    (photos, model) = survey(tmp)
    return {
        "model": model,
        "events": predict(photos, model, tmp / "events", "--events"),
        "plain": predict(photos, model, tmp / "plain"),
        "boxes": predict(photos, model, tmp / "boxes", "--detector", str(save_tiny_detector(tmp / "det.pt"))),
    }


def export(results: Path, out: Path) -> int:
    argv = ["export", str(results), "--export", "camtrap-dp", "--timezone", "+02:00", "--output-dir", str(out)]
    return tools_main(argv)


def test_the_export_carries_human_observations_beside_the_machines(made: dict, tmp_path: Path, capsys) -> None:
    results = copy_results(made["events"], tmp_path)
    session = ReviewSession.open(results)
    (first, second) = (session.folder.units[0], session.folder.units[3])
    session.decide(first.unit_id, "anna", [{"label": "Species B"}], count=3, comment="a pair, and a young one")
    session.decide(first.unit_id, "ben", [{"label": "Species B"}], count=2)
    session.decide(second.unit_id, "anna", [{"label": "blank"}])
    assert export(results, tmp_path / "out") == 0
    assert "3 human observations by 2 reviewer(s)" in capsys.readouterr().out

    package = tmp_path / "out" / "camtrap-dp"
    assert validate_camtrap_dp(package) == []
    observations = read_csv(package / "observations.csv")
    machine = [row for row in observations if row["classificationMethod"] == "machine"]
    human = [row for row in observations if row["classificationMethod"] == "human"]
    assert len(machine) == 9 + 7  # every photo and every event, as without a review
    fields = ("eventID", "classifiedBy", "observationType", "scientificName", "count")
    assert [tuple(row[name] for name in fields) for row in human] == [
        (first.unit_id, "anna", "animal", "Species B", "3"),
        (first.unit_id, "ben", "animal", "Species B", "2"),
        (second.unit_id, "anna", "blank", "", ""),
    ]
    machine_event = next(r for r in machine if r["observationLevel"] == "event" and r["eventID"] == first.unit_id)
    for row in human[:2]:  # placed like the machine's observation of the same event
        assert row["observationLevel"] == "event" and row["deploymentID"] == machine_event["deploymentID"]
        assert (row["eventStart"], row["eventEnd"]) == (machine_event["eventStart"], machine_event["eventEnd"])
        assert row["classificationTimestamp"].endswith("+00:00") and row["classificationProbability"] == ""
    assert human[0]["observationComments"] == "a pair, and a young one"

    # Undone: out of the export
    session.undo("ben")
    assert export(results, tmp_path / "again") == 0
    observations = read_csv(tmp_path / "again/camtrap-dp/observations.csv")
    assert [r["classifiedBy"] for r in observations if r["classificationMethod"] == "human"] == ["anna", "anna"]


def test_the_export_refuses_reviews_of_another_model(made: dict, tmp_path: Path, capsys) -> None:
    results = copy_results(made["events"], tmp_path)
    session = ReviewSession.open(results)
    session.decide(session.folder.units[0].unit_id, "anna", [{"label": "Species A"}])
    path = session.store.path
    path.write_text(path.read_text().replace(session.folder.model, "other-model"))
    assert export(results, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert "other-model" in err and "\n" not in err and not (tmp_path / "out").exists()


def test_review_stats_agreement_bands_precision_speed(made: dict, tmp_path: Path, capsys) -> None:
    results = copy_results(made["plain"], tmp_path)
    session = ReviewSession.open(results)
    units = session.folder.units
    for number, unit in enumerate(units[:6]):
        label = unit.answer.label if number < 4 else "Species A" if unit.answer.label != "Species A" else "Species B"
        session.decide(unit.unit_id, "anna", [{"label": label}], seconds=2.0 + number)
    session.decide(units[6].unit_id, "ben", [{"label": "blank"}], seconds=10.0)
    session.undo("ben")

    stats = review_stats(read_reviewed(results))
    assert (stats["decided"], stats["answers_checked"], stats["undone"]) == (6, 6, 1)
    assert stats["agreement"] == round(4 / 6, 4)
    assert sum(row["checked"] for row in stats["bands"]) == 6 and sum(row["corrected"] for row in stats["bands"]) == 2
    for row in stats["species"]:
        (low, high) = wilson_interval(row["confirmed"], row["checked"])
        assert row["ci95"] == [round(low, 4), round(high, 4)] and low <= row["precision"] <= high
    anna = next(row for row in stats["speed"] if row["reviewer"] == "anna")
    assert anna["decisions"] == 6 and anna["median_seconds"] == 4.5 and anna["per_hour"] == round(3600 / 4.5, 1)

    assert tools_main(["review-stats", str(results), "--json", str(tmp_path / "stats.json")]) == 0
    printed = capsys.readouterr().out
    assert "agreement with the machine: 66.7% of 6 answers checked" in printed
    assert "corrections by probability band" in printed and "review speed" in printed
    assert json.loads((tmp_path / "stats.json").read_text())["agreement"] == stats["agreement"]


def test_wilson_interval_known_values() -> None:
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 5) == pytest.approx((0.0, 0.4345), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_birder_calibrate_fits_on_the_reviewed_photos(made: dict, tmp_path: Path, capsys) -> None:
    results = copy_results(made["events"], tmp_path)
    session = ReviewSession.open(results)
    for number, unit in enumerate(session.folder.units):
        session.decide(unit.unit_id, "anna", [{"label": "blank" if number == 0 else CLASSES[number % 5]}])
    out = tmp_path / "calibrated.pt"
    argv = ["--weights", str(made["model"]), "--val", str(results / "reviews.csv"), "-o", str(out), "--no-progress"]
    # 7 events, 9 photos; the blank event's 2 photos are left out (said once). Seven labelled photos are read from
    # reviews.csv, and that is too few to fit a temperature (birder-calibrate needs 20): refused in one line, no file
    assert calibrate_main([*argv, "--workers", "0", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert "left out of the labelled photos: 1 decided blank" in captured.err
    assert "reviews.csv: 7 readable photo(s); a temperature needs at least 20 labelled photos" in captured.err
    assert not out.exists()


def test_review_crops_keep_cameras_whole_and_feed_birder_train(made: dict, tmp_path: Path, capsys) -> None:
    results = copy_results(made["boxes"], tmp_path)
    session = ReviewSession.open(results)
    for number, unit in enumerate(session.folder.units):
        labels = [{"box": box.key, "label": CLASSES[(number + i) % 3]} for (i, box) in enumerate(unit.boxes)]
        labels[-1]["label"] = "blank"  # a false detection: no crop
        session.decide(unit.unit_id, "anna", labels)
    out = tmp_path / "adapt"
    assert tools_main(["review-crops", str(results), "--output-dir", str(out), "--val-share", "0.34"]) == 0
    printed = capsys.readouterr().out
    train = read_csv(out / "train.csv")
    val = read_csv(out / "val.csv")
    assert len(train) + len(val) == 2 * 9 and "cameras 2 / 1" in printed
    assert all(Path(row["path"]).is_file() and Path(row["path"]).parent.parent == out / "crops" for row in train + val)
    # Whole cameras in one split (a crop is named after its photo, then its box)
    camera_of = {photo_file_stem(unit.unit_id): unit.camera for unit in session.folder.units}
    cameras = [{camera_of[Path(row["path"]).stem.rsplit("-", 1)[0]] for row in rows} for rows in (train, val)]
    assert (len(cameras[0]), len(cameras[1])) == (2, 1) and not cameras[0] & cameras[1]
    assert {row["label"] for row in train + val} <= set(CLASSES[:3])
    assert camera_split(["a", "b", "c"], 0.34, 0) == camera_split(["c", "b", "a"], 0.34, 0)
    # A second run into the same folder is refused (it would mix two runs' crops) unless --overwrite
    assert tools_main(["review-crops", str(results), "--output-dir", str(out)]) == 2
    assert "already holds the results of an earlier python -m birder.tools review-crops run" in capsys.readouterr().err
    assert (
        tools_main(["review-crops", str(results), "--output-dir", str(out), "--val-share", "0.34", "--overwrite"]) == 0
    )
    capsys.readouterr()
    assert read_csv(out / "train.csv") == train
    # Crops among the reviewed photos would be classified as photos by the next run over their folder: refused
    photos = session.folder.units[0].photos[0].file.parent
    assert tools_main(["review-crops", str(results), "--output-dir", str(photos / "adapt")]) == 2
    assert "would be read as photos" in capsys.readouterr().err and not (photos / "adapt").exists()

    argv = ["--init", str(made["model"]), "--train-csv", str(out / "train.csv"), "--val-csv", str(out / "val.csv")]
    argv += ["--output-dir", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4", "--workers", "0"]
    assert train_main([*argv, "--device", "cpu", "--no-progress", "--aug-level", "0"]) == 0
    assert list((tmp_path / "run").glob("*.pt"))
