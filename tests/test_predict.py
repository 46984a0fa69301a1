"""The batch-prediction library: finding photos, decoding them safely, the loop, species lists, summaries.

Also home of the generated photo collection the command-line tests use (``make_photo_folder``).
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_vit
from PIL import Image

import birder
from birder.distributed import resolve_device
from birder.errors import BirderError, UnknownModelError
from birder.inference import predictor as P
from birder.inference.classification import infer_image
from birder.inference.dataset import (
    ImageFileDataset,
    PackedPaths,
    PhotoMetadata,
    collate_photos,
    discover_images,
    read_photo_metadata,
)

CLASSES = ["Species A", "Species B", "Species C", "Species D", "Species E"]
RGB_STATS = {"mean": (0.52, 0.53, 0.49), "std": (0.23, 0.23, 0.26)}
MODEL_SIZE = (32, 48)
PHOTO_SIZE = (60, 40)  # PIL (width, height)

# EXIF written into the rotated photo: 52°31'12.5" S, 13°24'36" W, taken 2023-05-14 07:32:10.
EXIF_DATETIME = "2023:05:14 07:32:10"
EXIF_LATITUDE = -(52 + 31 / 60 + 12.5 / 3600)
EXIF_LONGITUDE = -(13 + 24 / 60 + 36 / 3600)

GOOD_PHOTOS = (
    "Species A/rgb.jpg",
    "Species A/gray.png",
    "Species B/rgba.png",
    "Species B/cmyk.jpg",
    "Species C/rotated.jpg",
    "loose/UPPER.JPEG",
)
BAD_PHOTOS = {  # file -> a word its failure reason must contain
    "loose/truncated.jpg": "truncated",
    "loose/empty.jpg": "empty",
    "loose/notes.jpg": "not a recognised image",
}


def random_photo(seed: int, mode: str = "RGB", size: tuple[int, int] = PHOTO_SIZE) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def exif_with_date_and_gps(orientation: int | None = None) -> Image.Exif:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    exif.get_ifd(0x8769)[0x9003] = EXIF_DATETIME
    gps = exif.get_ifd(0x8825)
    gps.update({1: "S", 2: (52.0, 31.0, 12.5), 3: "W", 4: (13.0, 24.0, 36.0)})
    return exif


def make_photo_folder(root: Path) -> Path:
    """Every kind of photo a collection holds, good and bad, in folders partly named after classes."""
    for name in {Path(p).parent for p in (*GOOD_PHOTOS, *BAD_PHOTOS)}:
        (root / name).mkdir(parents=True, exist_ok=True)

    random_photo(1).save(root / "Species A/rgb.jpg", quality=90)
    random_photo(2, "L").save(root / "Species A/gray.png")
    random_photo(3, "RGBA").save(root / "Species B/rgba.png")
    random_photo(4, "CMYK").save(root / "Species B/cmyk.jpg")
    random_photo(5).save(root / "Species C/rotated.jpg", exif=exif_with_date_and_gps(orientation=6))
    random_photo(6).save(root / "loose/UPPER.JPEG")
    random_photo(7).save(root / "loose/whole.jpg")
    data = (root / "loose/whole.jpg").read_bytes()
    (root / "loose/truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "loose/whole.jpg").unlink()
    (root / "loose/empty.jpg").write_bytes(b"")
    (root / "loose/notes.jpg").write_text("field notes, not a photo\n")
    (root / "loose/readme.txt").write_text("not an image extension: never picked up\n")
    return root


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    net = make_tiny_vit(num_classes=len(CLASSES), size=MODEL_SIZE, seed=seed)
    info = birder.ModelInfo({name: i for i, name in enumerate(CLASSES)}, None, RGB_STATS)
    return birder.save_model(net, path, info)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return make_photo_folder(tmp_path / "photos")


@pytest.fixture
def model():
    net = make_tiny_vit(num_classes=len(CLASSES), size=MODEL_SIZE)
    return (net, birder.classification_transform(MODEL_SIZE, RGB_STATS))


# ---------------------------------------------------------------------------------------------------------------------
# Finding photos
# ---------------------------------------------------------------------------------------------------------------------


def test_discover_is_recursive_case_insensitive_and_sorted(photos: Path) -> None:
    (photos / "loose/.hidden.jpg").write_bytes(b"x")  # macOS "._" files and the like are skipped
    (photos / ".thumbnails").mkdir()
    random_photo(9).save(photos / ".thumbnails/t.jpg")

    found = discover_images([photos])
    relative = [p.relative_to(photos).as_posix() for p in found]
    assert sorted(relative) == sorted([*GOOD_PHOTOS, *BAD_PHOTOS])
    assert relative == sorted(relative, key=lambda p: Path(p).parts)  # folder by folder, by name
    assert discover_images([photos]) == found  # deterministic


def test_discover_mixes_files_and_folders_once_each(photos: Path) -> None:
    text = photos / "loose/readme.txt"
    found = discover_images([text, photos / "Species A", photos / "Species A/rgb.jpg"])
    # A file named explicitly is taken whatever its extension; a photo reached twice is listed once
    assert found == [photos / "Species A/gray.png", photos / "Species A/rgb.jpg", text]


def test_discover_order_does_not_depend_on_the_order_of_the_inputs(photos: Path, monkeypatch) -> None:
    # One canonical order (by absolute path): a run started as "a/ b/" can be resumed as "b/ a/"
    inputs = [photos / "loose", photos / "Species B", photos / "Species A/rgb.jpg", photos / "Species A"]
    found = discover_images(inputs)
    assert discover_images(inputs[::-1]) == found
    assert found == sorted(found, key=lambda p: p.parts)
    # The same photo under two spellings is listed once, under the same spelling whichever input comes first
    monkeypatch.chdir(photos)
    twice = ["Species A", "Species A/../Species A/gray.png"]
    assert discover_images(twice) == discover_images(twice[::-1])
    assert len(discover_images(twice)) == 2


def test_discover_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(BirderError, match="does not exist"):
        discover_images([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(BirderError, match="no images found") as excinfo:
        discover_images([tmp_path / "empty"])
    assert "\n" not in str(excinfo.value)


# ---------------------------------------------------------------------------------------------------------------------
# EXIF date and position
# ---------------------------------------------------------------------------------------------------------------------


def test_exif_date_and_gps_in_decimal_degrees(tmp_path: Path) -> None:
    path = tmp_path / "field.jpg"
    random_photo(0).save(path, exif=exif_with_date_and_gps())
    meta = read_photo_metadata(path)
    assert meta.exif_datetime == "2023-05-14T07:32:10"
    assert meta.gps_latitude == pytest.approx(EXIF_LATITUDE, abs=1e-9)
    assert meta.gps_longitude == pytest.approx(EXIF_LONGITUDE, abs=1e-9)


def test_missing_or_broken_exif_gives_nothing(tmp_path: Path) -> None:
    random_photo(0).save(tmp_path / "plain.png")
    (tmp_path / "text.jpg").write_text("no")
    assert read_photo_metadata(tmp_path / "plain.png") == PhotoMetadata()
    assert read_photo_metadata(tmp_path / "text.jpg") == PhotoMetadata()
    assert read_photo_metadata(tmp_path / "missing.jpg") == PhotoMetadata()


# ---------------------------------------------------------------------------------------------------------------------
# Dataset and batch loop
# ---------------------------------------------------------------------------------------------------------------------


def test_dataset_returns_failures_instead_of_raising(photos: Path, model) -> None:
    (_, transform) = model
    paths = discover_images([photos])
    samples = [ImageFileDataset(paths, transform)[i] for i in range(len(paths))]
    failed = {paths[s.index].relative_to(photos).as_posix(): s.error for s in samples if s.tensor is None}
    assert set(failed) == set(BAD_PHOTOS)
    for name, word in BAD_PHOTOS.items():
        assert word in failed[name] and "\n" not in failed[name]
        assert str(photos) not in failed[name]  # the path is its own column

    batch = collate_photos(samples)
    assert batch.inputs.shape == (len(GOOD_PHOTOS), 3, *MODEL_SIZE)
    assert len(batch.failures) == len(BAD_PHOTOS)
    rotated = paths.index(photos / "Species C/rotated.jpg")
    assert batch.metadata[batch.indices.index(rotated)].gps_latitude == pytest.approx(EXIF_LATITUDE)


@pytest.mark.parametrize("tta", [False, True])
def test_predictor_matches_infer_image(photos: Path, model, tta: bool) -> None:
    (net, transform) = model
    paths = discover_images([photos])
    predictor = P.Predictor(net, transform, batch_size=4, tta=tta, return_embedding=True, return_logits=True)
    batches = list(predictor.predict_files(paths))
    assert sum(b.num_photos for b in batches) == len(paths)
    assert sorted(i for b in batches for i in b.indices + [f[0] for f in b.failures]) == list(range(len(paths)))

    for batch in batches:
        for row, index in enumerate(batch.indices):
            (expected, embedding) = infer_image(net, paths[index], transform, return_embedding=True, tta=tta)
            np.testing.assert_allclose(batch.probabilities[row], expected[0], atol=1e-5)
            np.testing.assert_allclose(batch.embeddings[row], embedding[0], atol=1e-5)
        if batch.indices and not tta:
            softmax = torch.softmax(torch.from_numpy(batch.logits), dim=1).numpy()
            np.testing.assert_allclose(softmax, batch.probabilities, atol=1e-6)


def test_predictor_with_worker_processes_keeps_order(photos: Path, model) -> None:
    (net, transform) = model
    paths = discover_images([photos])
    subset = [0, 2, 3, 5, 8]
    serial = list(P.Predictor(net, transform, batch_size=2).predict_files(paths, subset))
    parallel = list(P.Predictor(net, transform, batch_size=2, num_workers=2).predict_files(paths, subset))
    assert [b.indices for b in serial] == [b.indices for b in parallel]
    assert [i for b in parallel for i in b.indices + [f[0] for f in b.failures]] == subset
    for a, b in zip(serial, parallel, strict=True):
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)


def test_predictor_detection_features_and_amp(photos: Path, model) -> None:
    (net, transform) = model
    paths = discover_images([photos / "Species A"])
    predictor = P.Predictor(net, transform, return_features=True, amp=True)
    (batch,) = predictor.predict_files(paths)
    assert batch.features["neck"].shape == (2, 32, MODEL_SIZE[0] // 16, MODEL_SIZE[1] // 16)
    np.testing.assert_allclose(batch.probabilities.sum(axis=1), 1.0, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# Species lists, top-k, summary
# ---------------------------------------------------------------------------------------------------------------------


def test_species_file_and_renormalization(tmp_path: Path) -> None:
    path = tmp_path / "region.txt"
    path.write_text("# my region\nSpecies C\n\nSpecies A  # common here\nNot A Bird\nSpecies C\n")
    names = P.read_species_file(path)
    assert names == ["Species C", "Species A", "Not A Bird"]

    selection = P.ClassSelection({name: i for i, name in enumerate(CLASSES)}, names)
    assert selection.names == ["Species C", "Species A"] and selection.unknown == ["Not A Bird"]
    probs = np.array([[0.1, 0.2, 0.3, 0.4, 0.0], [0.0, 0.5, 0.0, 0.5, 0.0]], dtype=np.float32)
    restricted = selection.apply(probs)
    np.testing.assert_allclose(restricted, [[0.75, 0.25], [0.5, 0.5]], atol=1e-6)  # all mass outside: uniform


def test_species_file_errors(tmp_path: Path) -> None:
    with pytest.raises(BirderError, match="does not exist"):
        P.read_species_file(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("\n# nothing\n")
    with pytest.raises(BirderError, match="no class names"):
        P.read_species_file(tmp_path / "blank.txt")
    with pytest.raises(BirderError, match="none of the 1 species"):
        P.ClassSelection({"a": 0}, ["b"])


def test_top_k_and_summary() -> None:
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]], dtype=np.float32)
    (indices, values) = P.top_k(probs, 2)
    assert indices.tolist() == [[1, 2], [0, 1]]
    np.testing.assert_allclose(values, [[0.6, 0.3], [0.5, 0.25]])
    assert P.top_k(probs, 10)[0].shape == (2, 3)

    summary = P.RunSummary(["owl", "tit"], top_k=2)
    summary.add("x/owl/1.jpg", "owl", ["owl", "tit"])
    summary.add("x/owl/2.jpg", "uncertain", ["tit", "owl"])
    summary.add("x/misc/3.jpg", "tit", ["tit", "owl"])
    summary.failures = 1
    text = summary.format()
    assert "Classified 3 photos, 1 could not be read" in text
    assert "on the 2 photos in folders named after a class: top-1 50.0%, top-2 100.0%" in text
    assert summary.as_dict()["predictions"] == {"owl": 1, "uncertain": 1, "tit": 1}


# ---------------------------------------------------------------------------------------------------------------------
# Devices, sharding, models
# ---------------------------------------------------------------------------------------------------------------------


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(BirderError, match="no CUDA GPU"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", local_rank=3) == torch.device("cuda", 1)


def test_shards_are_disjoint_and_complete() -> None:
    remaining = [0, 1, 2, 4, 7, 8, 9]
    shards = [P.shard_indices(remaining, rank, 3) for rank in range(3)]
    assert sorted(i for shard in shards for i in shard) == remaining
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # no padding, balanced


def test_load_inference_model_resolution(tmp_path: Path) -> None:
    path = save_tiny_model(tmp_path / "tiny.pt")
    (net, info) = P.load_inference_model(None, path)
    assert not net.training and list(info.class_to_idx) == CLASSES
    assert P.load_inference_model("vit_b16", path)[0].network_name == "vit_b16"
    with pytest.raises(UnknownModelError, match="did you mean"):
        P.load_inference_model("vit_b61", path)
    with pytest.raises(BirderError, match="is a network, not a pretrained model"):
        P.load_inference_model("vit_b16")
    with pytest.raises(UnknownModelError):
        P.load_inference_model("no-such-model")
    with pytest.raises(BirderError, match="no such model file"):
        P.load_inference_model(None, tmp_path / "missing.pt")


def test_packed_paths() -> None:
    names = ["a/b.jpg", "vögel/möwe 1.JPG", "", "c.png"]
    packed = PackedPaths(names)
    assert len(packed) == 4 and [packed[i] for i in range(4)] == [Path(n) for n in names]
    assert packed[-1] == Path("c.png")
    with pytest.raises(IndexError):
        packed[4]


def test_plot_needs_the_plot_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from birder.plots import plot_predictions

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(BirderError, match=r"birder\[plot\]"):
        plot_predictions([("a.jpg", "owl", [("owl", 1.0)])], "x.png")


def broken_transform(image):
    raise RuntimeError("boom\nsecond line")


def broken_embedding(self, x):
    raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (7x32 and 48x32)")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_transform_error_stops_the_run(photos: Path, model, num_workers: int) -> None:
    # A transform that raises is not a bad photo: it would fail on every photo, so it must not read as "unreadable"
    (net, _) = model
    paths = discover_images([photos / "Species A"])
    predictor = P.Predictor(net, broken_transform, num_workers=num_workers)
    with pytest.raises(P.PredictionError) as excinfo:
        list(predictor.predict_files(paths))
    message = str(excinfo.value)
    assert "RuntimeError: boom second line" in message and "\n" not in message
    assert os.fspath(paths[0]) in message  # names the photo it was working on


def test_model_error_stops_the_run(photos: Path, model, monkeypatch: pytest.MonkeyPatch) -> None:
    (net, transform) = model
    monkeypatch.setattr(type(net), "embedding", broken_embedding)
    paths = discover_images([photos])
    with pytest.raises(P.PredictionError, match="mat1 and mat2 shapes") as excinfo:
        list(P.Predictor(net, transform, batch_size=4).predict_files(paths))
    assert "\n" not in str(excinfo.value) and isinstance(excinfo.value.__cause__, RuntimeError)


def test_only_decode_errors_are_a_photos_failure(tmp_path: Path, model) -> None:
    (_, transform) = model
    random_photo(0).save(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_text("not a photo")
    dataset = ImageFileDataset([tmp_path / "a.png", tmp_path / "b.jpg"], transform)
    assert dataset[0].error is None and dataset[0].run_error is None
    assert "not a recognised image" in dataset[1].error and dataset[1].run_error is None

    sample = ImageFileDataset([tmp_path / "a.png"], broken_transform)[0]
    assert sample.tensor is None and sample.error is None
    assert "RuntimeError: boom second line" in sample.run_error
