"""The field-chain benchmark's workload and its answer checks (``benchmarks.field_chain``), fast: small photos.

The full set is 12 MP; the generator is the same at any size, so the set's properties are checked on small frames
(one 12 MP photo is checked for its size and texture).
"""

import datetime as dt
import io
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import field_chain
from benchmarks.field_chain import Box
from birder.inference.dataset import read_photo_metadata

SMALL = (150, 200)  # height, width


@pytest.fixture(scope="module")
def field_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("field") / "photos"
    return (root, field_chain.make_field_set(root, 24, seed=3, size=SMALL))


def test_set_has_cameras_bursts_exif_and_truth(field_set: tuple[Path, dict]) -> None:
    (root, truth) = field_set
    photos = truth["photos"]
    assert len(photos) == 24 and json.loads((root / "truth.json").read_text()) == truth
    assert {item["camera"] for item in photos.values()} == set(field_chain.CAMERAS)
    assert sorted(p.relative_to(root).as_posix() for p in root.glob("*/*.JPG")) == sorted(photos)
    bursts: dict[int, list[dict]] = {}
    for name, item in photos.items():
        with Image.open(root / name) as image:
            assert image.format == "JPEG" and image.size == (SMALL[1], SMALL[0])
        metadata = read_photo_metadata(root / name)
        assert metadata.exif_datetime == item["taken"]  # DateTimeOriginal, read back as birder-predict reads it
        (lat, lon) = field_chain.CAMERAS[item["camera"]]
        assert metadata.gps_latitude == pytest.approx(lat, abs=1e-6)
        assert metadata.gps_longitude == pytest.approx(lon, abs=1e-6)
        bursts.setdefault(item["burst"], []).append(item)
    for shots in bursts.values():
        # Three photos one second apart from one camera, the same animals in each
        times = sorted(dt.datetime.fromisoformat(shot["taken"]) for shot in shots)
        assert len(shots) == 3 and [(b - a).total_seconds() for (a, b) in itertools.pairwise(times)] == [1.0, 1.0]
        assert len({shot["camera"] for shot in shots}) == 1
        assert len({tuple(sorted(shot["classes"])) for shot in shots}) <= 2  # an animal may find no place in a shot
    starts = sorted(min(dt.datetime.fromisoformat(s["taken"]) for s in shots) for shots in bursts.values())
    assert all((b - a).total_seconds() > 120 for (a, b) in itertools.pairwise(starts) if a != b)


def test_set_empty_share_and_animal_sizes(field_set: tuple[Path, dict]) -> None:
    (_, truth) = field_set
    photos = truth["photos"].values()
    empty = sum(item["count"] == 0 for item in photos) / len(photos)
    assert abs(empty - field_chain.EMPTY_SHARE) <= 1 / 8  # 8 bursts: the share is a multiple of 1/8
    frame = SMALL[0] * SMALL[1]
    for item in photos:
        assert item["count"] == len(item["boxes"]) == len(item["classes"]) and item["count"] <= 3
        for x, y, w, h in item["boxes"]:
            assert 0.004 <= w * h / frame <= 0.21  # 0.5-20 % of the frame (the side is rounded to a pixel)
            assert x >= 0 and y >= 0 and x + w <= SMALL[1] and y + h <= SMALL[0]
    assert any(item["count"] >= 2 for item in photos)


def test_set_is_cached_and_rebuilt_when_settings_change(field_set: tuple[Path, dict], tmp_path: Path) -> None:
    (root, truth) = field_set
    stamp = (root / "cam_1" / "IMG_0000.JPG").stat().st_mtime_ns
    assert field_chain.make_field_set(root, 24, seed=3, size=SMALL) == truth
    assert (root / "cam_1" / "IMG_0000.JPG").stat().st_mtime_ns == stamp  # not written again
    other = tmp_path / "photos"
    first = field_chain.make_field_set(other, 6, seed=3, size=SMALL)
    second = field_chain.make_field_set(other, 6, seed=4, size=SMALL)
    assert first["photos"] != second["photos"] and len(list(other.glob("*/*.JPG"))) == 6


def test_twelve_megapixel_photo_is_textured() -> None:
    # A flat frame compresses to a few hundred kB and decodes unrealistically fast; a textured one does not
    image = field_chain.field_background(field_chain.PHOTO_SIZE, np.random.default_rng(0))
    assert image.size == (4000, 3000)
    encoded = io.BytesIO()
    image.save(encoded, format="JPEG", quality=field_chain.JPEG_QUALITY)
    assert encoded.tell() > 2_000_000


def test_iou_and_box_comparison() -> None:
    assert field_chain.iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert field_chain.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert field_chain.iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    reference = {
        "cam_1/a.JPG": [Box((0, 0, 100, 100), "disc_0"), Box((200, 200, 300, 300), "star_1")],
        "cam_1/b.JPG": [Box((0, 0, 50, 50), "disc_0")],
        "cam_1/c.JPG": [],
    }
    other = {
        "cam_1/a.JPG": [Box((201, 200, 300, 300), "star_1"), Box((1, 1, 100, 100), "ring_0")],  # order differs
        "cam_1/b.JPG": [Box((0, 0, 50, 80), "disc_0")],  # IoU 0.625: moved
        "cam_1/c.JPG": [Box((0, 0, 5, 5), "disc_0")],  # a box the reference has not
    }
    figures = field_chain.compare_boxes(reference, other, min_iou=0.9)
    assert figures["boxes"] == 3 and figures["matched_boxes"] == 3
    assert figures["share_iou_at_least_0.9"] == pytest.approx(2 / 3)
    assert figures["share_species_changed"] == pytest.approx(1 / 3)
    assert figures["extra_boxes_in_other"] == 1


def test_count_accuracy_and_overlapping_boxes() -> None:
    truth = {
        "photos": {
            "cam_1/a.JPG": {"count": 2, "boxes": [[0, 0, 10, 10], [50, 50, 10, 10]], "classes": ["disc_0", "star_1"]},
            "cam_1/b.JPG": {"count": 1, "boxes": [[0, 0, 10, 10]], "classes": ["disc_0"]},
            "cam_1/c.JPG": {"count": 0, "boxes": [], "classes": []},
        }
    }
    kept = {
        "cam_1/a.JPG": [Box((0, 0, 10, 10), "disc_0"), Box((50, 50, 60, 60), "disc_0")],
        "cam_1/b.JPG": [Box((0, 0, 10, 10), "disc_0"), Box((1, 0, 11, 10), "ring_0")],  # one animal, two boxes
        "cam_1/c.JPG": [],
    }
    figures = field_chain.count_accuracy(kept, truth)
    assert figures["count_accuracy"] == pytest.approx(2 / 3)
    assert figures["photos_with_overlapping_boxes"] == 1 and figures["overlapping_examples"] == ["cam_1/b.JPG"]
    assert figures["boxes_per_photo"] == pytest.approx(4 / 3) and figures["true_animals_per_photo"] == 1.0
    # Species: a's second animal (star_1) was called disc_0; b's animal right
    assert field_chain.species_accuracy(kept, truth) == pytest.approx(2 / 3)


def test_read_boxes_of_a_results_folder(tmp_path: Path) -> None:
    rows = [
        "path,box,detections,x1,y1,x2,y2,det_class,det_score,source,top1_class",
        "/x/cam_1/a.JPG,1,2,0,0,10,10,animal,0.9,detection,disc_0",
        "/x/cam_1/a.JPG,2,2,5,5,20,20,animal,0.8,detection,star_1",
        "/x/cam_2/b.JPG,0,0,,,,,,,,",
        "/x/cam_3/c.JPG,0,0,,,,,,,whole-image,disc_0",
    ]
    (tmp_path / "results.csv").write_text("\n".join(rows) + "\n")
    boxes = field_chain.read_boxes(tmp_path)
    assert boxes == {
        "cam_1/a.JPG": [Box((0.0, 0.0, 10.0, 10.0), "disc_0"), Box((5.0, 5.0, 20.0, 20.0), "star_1")],
        "cam_2/b.JPG": [],
        "cam_3/c.JPG": [],
    }


def test_read_stages_when_recorded(tmp_path: Path) -> None:
    assert field_chain.read_stages(tmp_path) is None
    (tmp_path / "run.json").write_text(json.dumps({"photos": 3}))
    assert field_chain.read_stages(tmp_path) is None
    (tmp_path / "run.json").write_text(json.dumps({"stages": {"decode": 1.5, "detector": {"seconds": 3.0}}}))
    assert field_chain.read_stages(tmp_path) == {"decode": 1.5, "detector": 3.0}
    assert field_chain.stage_shares({"decode": 1.5}, 3.0) == {"decode": 0.5}


@pytest.mark.slow
def test_chain_runs_birder_predict_and_records_what_it_refuses(tmp_path: Path) -> None:
    # The whole chain through birder-predict in a child process (or two: a refusal is retried without the option;
    # about 20 s, minutes on a loaded machine), on tiny models and six small photos: every photo
    # gets its rows; an option this checkout refuses (--events or the Camtrap DP export with --detector before
    # issue 21) is dropped and recorded with the refusal's line, one accepted writes its output.
    from conftest import make_tiny_vit
    from detect_support import save_tiny_detector

    import birder

    photos = tmp_path / "photos"
    field_chain.make_field_set(photos, 6, seed=1, size=SMALL)
    names = [field_chain.class_name(c) for c in field_chain.CLASSES]
    info = birder.ModelInfo({name: i for (i, name) in enumerate(names)}, None, {"mean": (0.5,) * 3, "std": (0.25,) * 3})
    classifier = birder.save_model(make_tiny_vit(len(names), size=(32, 32)), tmp_path / "tiny.pt", info)
    common = {
        "taxonomy": field_chain.write_taxonomy(tmp_path / "taxonomy.csv"),
        "prior": field_chain.build_prior(tmp_path, classifier, seed=0),
    }
    output = tmp_path / "out"
    run = field_chain.ChainRun("tiny", field_chain.REPO, classifier, save_tiny_detector(tmp_path / "det.pt"), output)
    result = field_chain.run_chain(run, photos, common, workers=0)
    assert result["returncode"] == 0, result
    assert result["seconds"] > 0 and result["peak_rss_bytes"] > 50 * 2**20  # a Python with torch loaded
    assert set(field_chain.read_boxes(output)) == {p.relative_to(photos).as_posix() for p in photos.glob("*/*.JPG")}
    refused = {item["option"]: item["message"] for item in result["refused"]}
    for option in ("--events", "--export camtrap-dp"):
        if option in refused:
            assert option.split()[0] in refused[option] and option not in result["command"]
        else:
            assert option in result["command"]
    if "--export camtrap-dp" not in refused:
        assert any(output.rglob("datapackage.json"))


def test_a_runs_peak_memory_is_its_own_not_the_benchmarks() -> None:
    # The benchmark trains models before it runs the chain: its own peak (GBs) must not become every run's. A
    # process that held 600 MB starts a bare Python; the peak reported is the bare Python's (tens of MB).
    ballast = np.ones(600 * 2**20 // 8)  # touched: resident
    try:
        result = field_chain._run_child([sys.executable, "-c", "import sys; sys.exit(3)"], field_chain.REPO)
    finally:
        del ballast
    assert result["returncode"] == 3  # the run's own exit code, through the launcher
    assert 1 * 2**20 < result["peak_rss_bytes"] < 200 * 2**20, result
