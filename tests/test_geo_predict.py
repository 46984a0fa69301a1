"""The prior, events and exports in ``birder-predict`` runs (tiny model, generated camera folders)."""

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_geo_export import CAMERA_A, make_camera_folders
from test_predict import CLASSES, MODEL_SIZE, save_tiny_model

import birder
import birder.io.images
from birder.errors import BirderError
from birder.geo.prior import LocationPrior
from birder.geo.prior_file import load_prior, save_prior
from birder.geo.records import Records
from birder.geo.validate import validate_camtrap_dp, validate_coco_ct
from birder.inference.classification import infer_batch, infer_image
from birder.inference.decision import apply_prior
from birder.scripts.predict import main

PRESENT = "Species E"  # the one species the prior knows around camera A


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def by_name(rows: list[dict[str, str]], root: Path) -> dict[str, dict[str, str]]:
    return {Path(row["path"]).resolve().relative_to(root.resolve()).as_posix(): row for row in rows}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("geo-predict")
    rng = np.random.default_rng(0)
    count = 500
    records = Records(
        CAMERA_A[0] + rng.standard_normal(count) * 0.5,
        CAMERA_A[1] + rng.standard_normal(count) * 0.5,
        rng.integers(100, 200, count).astype(np.int16),
        np.full(count, CLASSES.index(PRESENT), np.int32),
        np.ones(count, np.float32),
    )
    return {
        "model": save_tiny_model(tmp / "tiny.pt"),
        "photos": make_camera_folders(tmp / "photos"),
        "prior": save_prior(LocationPrior.build(records, CLASSES), tmp / "prior.bpr"),
        "other_prior": save_prior(LocationPrior.build(records, [*CLASSES, "Species F"]), tmp / "other.bpr"),
    }


def run(world: dict[str, Path], out: Path, *extra: str) -> int:
    args = ["--weights", str(world["model"]), str(world["photos"]), "--output-dir", str(out), "-j", "0"]
    return main([*args, "--no-progress", *extra])


def test_prior_adjusts_keeps_image_top_k_flags_and_marks_modes(world: dict[str, Path], tmp_path: Path) -> None:
    assert run(world, tmp_path / "plain") == 0
    assert run(world, tmp_path / "prior", "--prior", str(world["prior"])) == 0
    plain = by_name(read_csv(tmp_path / "plain" / "results.csv"), world["photos"])
    rows = by_name(read_csv(tmp_path / "prior" / "results.csv"), world["photos"])

    assert {name: row["prior"] for (name, row) in rows.items()} == {
        "camA/0001.jpg": "place_day",
        "camA/0002.jpg": "place_day",
        "camA/0003.jpg": "place_day",
        "camB/0001.jpg": "none",  # a date but no place: the image's answer
        "camB/0002.jpg": "none",
    }
    for name, row in rows.items():
        for rank in range(1, 6):  # the image-only top-k, beside the adjusted one
            assert row[f"image_top{rank}_class"] == plain[name][f"top{rank}_class"]
            assert row[f"image_top{rank}_prob"] == plain[name][f"top{rank}_prob"]
        camera_a = name.startswith("camA")
        assert row["prediction"] == (PRESENT if camera_a else plain[name]["prediction"])
        expected_flag = ("true" if plain[name]["top1_class"] != PRESENT else "false") if camera_a else ""
        assert row["out_of_range"] == expected_flag

    # The adjusted probabilities are the decision order's step 4 on infer_image's probabilities
    (net, info) = birder.load_model(world["model"], inference=True)
    image = infer_image(
        net, world["photos"] / "camA/0001.jpg", birder.classification_transform(MODEL_SIZE, info.rgb_stats)
    )[0]
    answer = load_prior(world["prior"]).lookup(CAMERA_A, "2023-05-14")
    expected = apply_prior(image, answer.vector, 1.0)[0]
    row = rows["camA/0001.jpg"]
    assert CLASSES[int(np.argmax(expected))] == row["top1_class"]
    assert float(row["top1_prob"]) == pytest.approx(expected.max(), abs=1e-6)


def test_lat_lon_date_for_all_strength_zero_and_per_photo_file(world: dict[str, Path], tmp_path: Path) -> None:
    args = ["--prior", str(world["prior"]), "--lat", str(CAMERA_A[0]), "--lon", str(CAMERA_A[1])]
    assert run(world, tmp_path / "all", *args) == 0
    rows = by_name(read_csv(tmp_path / "all" / "results.csv"), world["photos"])
    assert rows["camB/0001.jpg"]["prior"] == "place_day" and rows["camB/0002.jpg"]["prior"] == "place"  # no date
    assert all(row["prediction"] == PRESENT for row in rows.values())

    assert run(world, tmp_path / "off", *args, "--prior-strength", "0") == 0
    for row in read_csv(tmp_path / "off" / "results.csv"):  # strength 0: the image's answer, flags still said
        assert row["top1_class"] == row["image_top1_class"] and row["top1_prob"] == row["image_top1_prob"]
        assert row["out_of_range"] == ("true" if row["image_top1_class"] != PRESENT else "false")

    locations = tmp_path / "locations.csv"
    locations.write_text(f"path,latitude,longitude,date\n0002.jpg,{CAMERA_A[0]},{CAMERA_A[1]},2023-06-01\n")
    assert run(world, tmp_path / "file", "--prior", str(world["prior"]), "--locations", str(locations)) == 0
    rows = by_name(read_csv(tmp_path / "file" / "results.csv"), world["photos"])
    assert rows["camB/0002.jpg"]["prior"] == "place_day" and rows["camB/0001.jpg"]["prior"] == "none"


def test_prior_errors_are_one_line(world: dict[str, Path], tmp_path: Path, capsys) -> None:
    cases = {
        "built for another model's classes": ["--prior", str(world["other_prior"])],
        "needs --prior": ["--lat", "48.2", "--lon", "16.4"],
        "give both --lat and --lon": ["--prior", str(world["prior"]), "--lat", "48.2"],
        "is not a date": ["--prior", str(world["prior"]), "--date", "May 5"],
        "--timezone": ["--export", "camtrap-dp"],
        "not a duration": ["--events", "--event-gap", "soon"],
    }
    for expected, extra in cases.items():
        assert run(world, tmp_path / "out", *extra) == 2, expected
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("birder-predict: error:") and expected in err
    assert not (tmp_path / "out" / "results.csv").exists()  # refused before any photo


def test_events_and_exports_in_one_run(world: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    args = ["--prior", str(world["prior"]), "--events", "--event-gap", "60s", "--format", "parquet"]
    args += ["--export", "camtrap-dp", "--export", "coco-ct", "--timezone", "+02:00"]
    assert run(world, out, *args, "--deployment-lat", "47.0", "--deployment-lon", "15.0") == 0
    printed = capsys.readouterr().out
    assert "Events: 4, 1 of them photos without an EXIF time" in printed

    photos = by_name(pq.read_table(out / "results.parquet").to_pylist(), world["photos"])
    events = {row["event_id"]: row for row in pq.read_table(out / "events.parquet").to_pylist()}
    assert photos["camA/0001.jpg"]["event_id"] == photos["camA/0002.jpg"]["event_id"]  # 30 s apart
    assert len({row["event_id"] for row in photos.values()}) == 4
    untimed = events[photos["camB/0002.jpg"]["event_id"]]
    assert untimed["timed"] == "false" and untimed["photos"] == "1" and untimed["prior"] == "none"
    burst = events[photos["camA/0001.jpg"]["event_id"]]
    assert burst["photos"] == "2" and burst["prior"] == "place_day" and burst["prediction"] == PRESENT
    assert burst["start"] == "2023-05-14T07:00:00" and burst["end"] == "2023-05-14T07:00:30"

    # One event's image probabilities are the geometric mean of its photos'; the prior is applied once
    probabilities = {
        Path(r["path"]).name + Path(r["path"]).parent.name: r
        for r in pq.read_table(out / "probabilities.parquet").to_pylist()
    }
    frames = np.array([[probabilities[f"{n}camA"][c] for c in CLASSES] for n in ("0001.jpg", "0002.jpg")])
    combined = np.exp(np.log(frames).mean(axis=0))
    combined /= combined.sum()
    assert burst["image_top1_class"] == CLASSES[int(np.argmax(combined))]
    assert burst["image_top1_prob"] == pytest.approx(combined.max(), abs=1e-6)

    assert validate_camtrap_dp(out / "camtrap-dp") == []
    observations = read_csv(out / "camtrap-dp" / "observations.csv")
    assert {row["observationLevel"] for row in observations} == {"media", "event"}
    assert all(row["eventID"] for row in observations)
    assert validate_coco_ct(out / "coco-ct.json") == []
    images = json.loads((out / "coco-ct.json").read_text())["images"]
    assert {image["seq_num_frames"] for image in images if image["location"] == "camA"} == {1, 2}


def test_serve_applies_the_prior_from_form_fields(tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from serve_support import SPECIES, expected_outputs, make_photos, running_server, saved_and_loaded_tiny_model

    from birder.serve.app import create_app

    (net, model_info) = saved_and_loaded_tiny_model(tmp_path)
    photo = make_photos(tmp_path / "photos")["robin.jpg"]
    (image, _) = expected_outputs(net, model_info, photo)
    rng = np.random.default_rng(1)
    present = SPECIES.index("Great Tit")
    records = Records(
        CAMERA_A[0] + rng.standard_normal(300) * 0.5,
        CAMERA_A[1] + rng.standard_normal(300) * 0.5,
        rng.integers(100, 200, 300).astype(np.int16),
        np.full(300, present, np.int32),
        np.ones(300, np.float32),
    )
    prior = LocationPrior.build(records, SPECIES)
    with pytest.raises(BirderError, match="another model's classes"):
        create_app(net, model_info, prior=LocationPrior.build(records, SPECIES[:4]))

    with running_server(create_app(net, model_info, name="tiny", prior=prior)) as url:
        post = lambda data: httpx.post(  # noqa: E731
            f"{url}/v1/classify", files={"image": photo.read_bytes()}, data=data, timeout=60
        )
        answer = post({"lat": str(CAMERA_A[0]), "lon": str(CAMERA_A[1]), "date": "2023-05-14"}).json()
        assert answer["prior"]["mode"] == "place_day" and answer["prior"]["strength"] == 1.0
        expected = apply_prior(image[None], prior.lookup(CAMERA_A, "2023-05-14").vector, 1.0)[0]
        assert answer["predictions"][0]["species"] == "Great Tit"
        assert answer["predictions"][0]["probability"] == pytest.approx(expected.max(), abs=1e-5)
        assert answer["image_predictions"][0]["probability"] == pytest.approx(image.max(), abs=1e-5)
        assert answer["prior"]["out_of_range"] == (SPECIES[int(np.argmax(image))] != "Great Tit")

        assert post({"lat": str(CAMERA_A[0]), "lon": str(CAMERA_A[1])}).json()["prior"]["mode"] == "place"
        plain = post({})
        assert plain.json()["prior"] == {"mode": "none", "strength": 1.0, "out_of_range": None}
        assert plain.json()["predictions"][0]["probability"] == pytest.approx(image.max(), abs=1e-5)
        bad = post({"lat": "north", "lon": "16"})
        assert bad.status_code == 400 and "'lat' must be a number" in bad.json()["error"]


def test_infer_image_and_batch_take_prior_location_and_date(world: dict[str, Path]) -> None:
    (net, info) = birder.load_model(world["model"], inference=True)
    transform = birder.classification_transform(MODEL_SIZE, info.rgb_stats)
    photo = world["photos"] / "camA/0001.jpg"
    (image, _) = infer_image(net, photo, transform)
    prior = load_prior(world["prior"])

    (adjusted, _) = infer_image(net, photo, transform, prior=prior, location=CAMERA_A, date="2023-05-14")
    expected = apply_prior(image, prior.lookup(CAMERA_A, "2023-05-14").vector, 1.0)
    np.testing.assert_allclose(adjusted, expected, rtol=1e-5)
    assert CLASSES[int(np.argmax(adjusted))] == PRESENT
    # A path works too; no location: the image's own probabilities; strength 0: no change
    (from_file, _) = infer_image(net, photo, transform, prior=world["prior"], location=CAMERA_A, date="2023-05-14")
    np.testing.assert_allclose(from_file, adjusted)
    np.testing.assert_allclose(infer_image(net, photo, transform, prior=prior, date="2023-05-14")[0], image, rtol=1e-6)
    (off, _) = infer_image(net, photo, transform, prior=prior, location=CAMERA_A, prior_strength=0.0)
    np.testing.assert_allclose(off, image, rtol=1e-6)

    # A batch: one place per image (None: no place)
    batch = torch.stack([transform(birder.io.images.load_image(photo))] * 2)
    (both, _) = infer_batch(net, batch, prior=prior, location=[CAMERA_A, None], date=["2023-05-14", None])
    np.testing.assert_allclose(both[0], adjusted[0], rtol=1e-5)
    np.testing.assert_allclose(both[1], image[0], rtol=1e-5)
    with pytest.raises(BirderError, match="cannot be combined with return_logits"):
        infer_batch(net, batch, prior=prior, location=CAMERA_A, return_logits=True)
    with pytest.raises(BirderError, match="3 locations or dates for 2 images"):
        infer_batch(net, batch, prior=prior, location=[CAMERA_A] * 3)


def test_serve_command_refuses_a_prior_for_other_classes(world: dict[str, Path], capsys) -> None:
    pytest.importorskip("fastapi")
    from birder.scripts.serve import main as serve_main

    assert serve_main(["--weights", str(world["model"]), "--prior", str(world["other_prior"]), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "built for another model's classes" in err
