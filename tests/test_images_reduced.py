"""Reduced-scale JPEG decoding (birder.io.images.load_image_reduced): the photo :func:`load_image` gives, at 1/2, 1/4
or 1/8 of each side; crops cut from it in full-resolution coordinates; the detection loader that decodes with it."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from birder.data.transforms import detection_transform
from birder.errors import ImageDecodeError
from birder.inference.crops import crop_box
from birder.inference.dataset import DetectionInput, DetectionInputs, ImageFileDataset, collate_photos
from birder.io.images import (
    ReducedImage,
    crop_rectangle,
    dct_reduction,
    load_image,
    load_image_reduced,
    reduced_crops,
)

STATS = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def textured(seed: int, width: int = 1600, height: int = 1200) -> Image.Image:
    """A photo-like texture: noise at several scales (a flat image would hide every resampling difference)."""
    rng = np.random.default_rng(seed)
    layers = np.zeros((height, width, 3), np.float32)
    for cells, weight in ((6, 0.5), (40, 0.3), (200, 0.2)):
        coarse = rng.random((max(cells * height // width, 2), cells, 3)).astype(np.float32)
        layer = Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
        layers += weight * np.asarray(layer, np.float32)
    return Image.fromarray(np.clip(layers, 0, 255).astype(np.uint8))


def mean_abs_difference(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


def shrunk(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("reduced") / "photo.jpg"
    textured(0).save(path, quality=90)
    return path


# Decoding


def test_jpeg_decodes_at_the_smallest_scale_that_keeps_the_long_side(photo_file: Path) -> None:
    full = load_image(photo_file)
    reduced = load_image_reduced(photo_file, long_side=300)

    # 1600 / 8 = 200 < 300 <= 1600 / 4
    assert (reduced.reduction, reduced.scale, reduced.full_size, reduced.full_hw) == (
        4,
        4.0,
        (1600, 1200),
        (1200, 1600),
    )
    assert reduced.image.mode == "RGB" and reduced.image.size == (400, 300)
    assert mean_abs_difference(reduced.image, shrunk(full, (400, 300))) < 3.0
    assert load_image_reduced(photo_file, long_side=200).reduction == 8
    assert load_image_reduced(photo_file, long_side=201).reduction == 4
    assert load_image_reduced(photo_file, long_side=300, short_side=400).reduction == 2


def test_no_reduction_when_the_photo_is_not_larger_than_asked(photo_file: Path) -> None:
    full = load_image(photo_file)
    for decoded in (load_image_reduced(photo_file, long_side=1000), load_image_reduced(photo_file, max_reduction=1)):
        assert decoded.reduction == 1 and decoded.full_size == full.size
        assert np.array_equal(np.asarray(decoded.image), np.asarray(full))


def test_max_reduction_caps_the_scale(photo_file: Path) -> None:
    reduced = load_image_reduced(photo_file, max_reduction=2)
    assert reduced.reduction == 2 and reduced.image.size == (800, 600)


def test_progressive_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "progressive.jpg"
    textured(1).save(path, quality=90, progressive=True)
    reduced = load_image_reduced(path, long_side=400)
    assert reduced.reduction == 4 and reduced.image.size == (400, 300)
    assert mean_abs_difference(reduced.image, shrunk(load_image(path), (400, 300))) < 3.0


def test_cmyk_jpeg_becomes_rgb_as_load_image_makes_it(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    textured(2, 800, 600).convert("CMYK").save(path, quality=95)
    reduced = load_image_reduced(path, long_side=200)
    assert reduced.reduction == 4 and reduced.image.mode == "RGB" and reduced.full_size == (800, 600)
    assert mean_abs_difference(reduced.image, shrunk(load_image(path), (200, 150))) < 3.0


@pytest.mark.parametrize("orientation", [6, 8])  # displayed turned 90 and 270 degrees
def test_exif_rotation_applies_and_the_full_size_is_the_rotated_one(tmp_path: Path, orientation: int) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    textured(3, 800, 600).save(path, quality=90, exif=exif)
    full = load_image(path)
    assert full.size == (600, 800)

    reduced = load_image_reduced(path, long_side=200)
    assert reduced.reduction == 4 and reduced.full_size == (600, 800) and reduced.image.size == (150, 200)
    assert mean_abs_difference(reduced.image, shrunk(full, (150, 200))) < 3.0


def test_png_is_decoded_in_full_as_load_image_decodes_it(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    textured(4, 400, 300).save(path)
    sixteen = tmp_path / "sixteen.png"
    Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)).save(sixteen)
    for source in (path, sixteen):
        reduced = load_image_reduced(source, long_side=50)
        full = load_image(source)
        assert reduced.reduction == 1 and reduced.full_size == full.size
        assert np.array_equal(np.asarray(reduced.image), np.asarray(full))


def _write_broken(tmp_path: Path) -> list[Path]:
    truncated = tmp_path / "truncated.jpg"
    textured(5, 400, 300).save(truncated, quality=90)
    truncated.write_bytes(truncated.read_bytes()[:500])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    return [truncated, text, empty, tmp_path / "missing.jpg", tmp_path]


def test_a_broken_file_is_the_same_one_line_error(tmp_path: Path) -> None:
    for path in _write_broken(tmp_path):
        with pytest.raises(ImageDecodeError) as expected:
            load_image(path)
        with pytest.raises(ImageDecodeError) as got:
            load_image_reduced(path, long_side=50)
        assert str(got.value) == str(expected.value) and "\n" not in str(got.value)


def test_dct_reduction_rounds_sides_up_as_libjpeg_does() -> None:
    assert dct_reduction((4000, 3000), long_side=512) == 4  # 500 < 512 at 1/8
    assert dct_reduction((4096, 3072), long_side=512) == 8
    assert dct_reduction((4001, 3001), long_side=501) == 8  # 4001 / 8 rounds up to 501
    assert dct_reduction((4000, 3000), short_side=3000) == 1
    assert dct_reduction((100, 80), long_side=1000) == 1


# Crops


def test_crop_rectangle_is_what_crop_box_cuts() -> None:
    photo = textured(6, 300, 200)
    rng = np.random.default_rng(0)
    for _ in range(200):
        (x1, x2) = sorted(rng.uniform(-20, 320, 2))
        (y1, y2) = sorted(rng.uniform(-20, 220, 2))
        margin = float(rng.choice([0.0, 0.1, 0.25]))
        expected = crop_box(photo, (x1, y1, x2, y2), margin)
        got = photo.crop(crop_rectangle(photo.size, (x1, y1, x2, y2), margin))
        assert np.array_equal(np.asarray(got), np.asarray(expected))


def test_a_full_decode_crops_exactly_as_crop_box(photo_file: Path) -> None:
    full = load_image(photo_file)
    decoded = load_image_reduced(photo_file, max_reduction=1)
    box = (100.5, 200.2, 130.7, 260.9)
    crop = decoded.crop(box, 0.1, (224, 224))  # far smaller than 224: only full resolution has all its pixels
    assert crop is not None and np.array_equal(np.asarray(crop), np.asarray(crop_box(full, box, 0.1)))


def test_crops_from_the_reduced_decode_match_crops_from_the_full_decode(photo_file: Path) -> None:
    full = load_image(photo_file)
    reduced = load_image_reduced(photo_file, long_side=300)  # 1/4
    classifier_size = (64, 64)
    rng = np.random.default_rng(1)
    cut = 0
    for _ in range(30):
        (width, height) = rng.uniform(300, 1000, 2)
        (x1, y1) = (rng.uniform(-50, 1600 - width / 2), rng.uniform(-50, 1200 - height / 2))
        box = (x1, y1, x1 + width, y1 + height)
        expected = shrunk(crop_box(full, box, 0.1), classifier_size)
        crop = reduced.crop(box, 0.1, classifier_size)
        needed = reduced.crop_reduction(box, 0.1, classifier_size)
        if crop is None:
            # Too few pixels at 1/4: the decode it names has them
            assert needed < 4
            crop = load_image_reduced(photo_file, max_reduction=needed).crop(box, 0.1, classifier_size)
            assert crop is not None
        else:
            cut += 1
            assert needed >= 4
        assert min(crop.size) >= 64
        assert mean_abs_difference(shrunk(crop, classifier_size), expected) < 4.0
    assert cut >= 10  # most of these boxes are large enough for the reduced decode


def test_resized_crops_are_the_full_decodes_crops_resized_the_same_way(photo_file: Path) -> None:
    full = load_image(photo_file)
    reduced = load_image_reduced(photo_file, long_side=300)  # 1/4
    classifier_size = (64, 80)
    rng = np.random.default_rng(2)
    for _ in range(20):
        (width, height) = rng.uniform(350, 1000, 2)
        (x1, y1) = (rng.uniform(-50, 1600 - width / 2), rng.uniform(-50, 1200 - height / 2))
        box = (x1, y1, x1 + width, y1 + height)
        crop = reduced.crop_resized(box, 0.1, classifier_size)
        assert crop is not None and crop.size == (80, 64)
        # Exact edges: a crop one decoded pixel (4 full-resolution pixels) off differs by about 4 here
        assert mean_abs_difference(crop, shrunk(crop_box(full, box, 0.1), (80, 64))) < 1.0


def test_reduced_crops_decode_again_only_at_the_scale_the_smallest_box_needs(photo_file: Path) -> None:
    full = load_image(photo_file)
    reduced = load_image_reduced(photo_file, long_side=300)  # 1/4
    large = (100.0, 100.0, 700.0, 600.0)  # 600 x 500: 150 x 125 at 1/4
    medium = (800.0, 300.0, 1100.0, 550.0)  # 300 x 250: 150 x 125 at 1/2
    small = (1200.0, 900.0, 1260.0, 950.0)  # 60 x 50: under 100 even in full
    size = (100, 100)

    assert reduced_crops(photo_file, reduced, [large], 0.0, size)[1] == 0
    assert reduced_crops(photo_file, reduced, [large, medium], 0.0, size)[1] == 2
    (crops, again) = reduced_crops(photo_file, reduced, [large, small, medium], 0.0, size)
    assert again == 1
    for box, crop in zip([large, small, medium], crops, strict=True):
        assert crop.size == (100, 100)
        assert mean_abs_difference(crop, shrunk(crop_box(full, box, 0.0), (100, 100))) < 1.0


def test_a_small_box_asks_for_full_resolution(photo_file: Path) -> None:
    reduced = load_image_reduced(photo_file, long_side=300)
    box = (500.0, 500.0, 600.0, 560.0)  # 120 x 72 px with the margin: under 224 even at full resolution
    assert reduced.crop(box, 0.1, (224, 224)) is None
    assert reduced.crop_reduction(box, 0.1, (224, 224)) == 1
    # 600 x 400 px: 1/2 gives 300 x 200, so a 200 x 250 classifier needs 1/2, a 100 x 150 one has enough at 1/4
    big = (100.0, 100.0, 700.0, 500.0)
    assert reduced.crop_reduction(big, 0.0, (200, 250)) == 2
    assert reduced.crop_reduction(big, 0.0, (100, 150)) == 4
    assert reduced.crop(big, 0.0, (100, 150)).size == (150, 100)


# The detection loader


def test_the_detector_input_of_a_reduced_decode_is_nearly_the_full_one(photo_file: Path) -> None:
    transform = detection_transform((256, 256), STATS)
    inputs = DetectionInputs(transform, (256, 256))
    decoded = inputs.decode(photo_file)
    assert isinstance(decoded, ReducedImage) and decoded.reduction == 4  # 400 px long side >= 256 > 200
    sample = inputs(decoded)
    assert isinstance(sample, DetectionInput) and sample.full_hw == (1200, 1600) and sample.scale == 4.0
    reference = transform(load_image(photo_file))
    assert sample.tensor.shape == reference.shape == (3, 192, 256)
    # In 0..255 pixel units: std 0.25 -> 255 * 0.25 per unit of the normalised tensor
    difference = (sample.tensor - reference).abs() * 255 * 0.25
    assert float(difference.mean()) < 1.5 and float(difference.max()) < 40


def test_the_dataset_decodes_with_the_transforms_decoder_and_reports_bad_photos(
    photo_file: Path, tmp_path: Path
) -> None:
    broken = _write_broken(tmp_path)[0]
    transform = detection_transform((256, 256), STATS)
    reduced_set = ImageFileDataset([photo_file, broken], DetectionInputs(transform, (256, 256)), read_metadata=False)
    full_set = ImageFileDataset([photo_file, broken], transform, read_metadata=False)
    loader = torch.utils.data.DataLoader(
        reduced_set, batch_size=2, num_workers=1, collate_fn=lambda samples: collate_photos(samples, stack=False)
    )
    (batch,) = list(loader)

    assert batch.indices == [0] and batch.failures == [(1, full_set[1].error)] and full_set[1].error
    (item,) = batch.inputs
    assert item.photo.image.size == (400, 300) and item.full_hw == (1200, 1600)
    assert item.tensor.shape == full_set[0].tensor.shape
