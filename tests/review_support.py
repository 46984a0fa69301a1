"""Results folders to review, made by a real ``birder-predict`` run of a tiny model on generated camera folders."""

import csv
import datetime as dt
import shutil
from pathlib import Path

from test_geo_export import camera_exif
from test_predict import CLASSES, random_photo, save_tiny_model

from birder.scripts.predict import main as predict_main

START = dt.datetime(2023, 5, 14, 7, 0, 0)
CAMERAS = {"camA": (48.2082, 16.3738), "camB": (47.0707, 15.4395), "camC": (46.6247, 14.3053)}
# Per camera: (seconds after START) of each photo; photos more than 120 s apart are separate events
SHOTS = {"camA": (0, 30, 3600, 7200), "camB": (0, 40, 5000), "camC": (0, 9000)}


def make_survey_photos(root: Path) -> Path:
    """Three camera folders of timed photos with GPS: ``camA/0001.jpg`` ...: 9 photos, 7 events."""
    seed = 0
    for camera, offsets in SHOTS.items():
        for number, seconds in enumerate(offsets, start=1):
            path = root / camera / f"{number:04d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            taken = START + dt.timedelta(seconds=seconds)
            random_photo(seed).save(path, exif=camera_exif(taken, CAMERAS[camera]))
            seed += 1
    return root


def predict(photos: Path, model: Path, out: Path, *extra: str) -> Path:
    argv = ["--weights", str(model), str(photos), "--output-dir", str(out), "-j", "0", "--no-progress", *extra]
    assert predict_main(argv) == 0
    return out


def survey(directory: Path) -> tuple[Path, Path]:
    """(photos, model) in ``directory``."""
    return (make_survey_photos(directory / "photos"), save_tiny_model(directory / "tiny.pt"))


def copy_results(results: Path, into: Path) -> Path:
    """A private copy of a results folder (each test writes its own reviews.csv)."""
    return Path(shutil.copytree(results, into / results.name))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


__all__ = ["CLASSES", "copy_results", "predict", "read_csv", "survey"]
