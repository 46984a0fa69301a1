"""Tests of birder.io.images: every PIL mode becomes 8-bit RGB, every bad file a one-line ImageDecodeError."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from birder.errors import ImageDecodeError
from birder.io.images import IMAGE_EXTENSIONS, find_images, is_hidden, is_image_file, load_image

WHITE = (255, 255, 255)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _random_rgb(rng: np.random.Generator, height: int = 32, width: int = 48) -> np.ndarray:
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _assert_rgb8(image: Image.Image, size: tuple[int, int]) -> None:
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    assert image.size == size


def _assert_decode_error(source, name: str) -> str:
    with pytest.raises(ImageDecodeError) as excinfo:
        load_image(source)
    message = str(excinfo.value)
    assert "\n" not in message
    assert name in message
    return message


# Good images


def test_rgb_jpeg(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "photo.jpg"
    Image.fromarray(_random_rgb(rng)).save(path, quality=95)
    _assert_rgb8(load_image(path), (48, 32))
    _assert_rgb8(load_image(str(path)), (48, 32))


def test_rgb_png_pixels_unchanged(tmp_path: Path, rng: np.random.Generator) -> None:
    pixels = _random_rgb(rng)
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)
    np.testing.assert_array_equal(np.asarray(load_image(path)), pixels)


def test_rgb_pil_image_is_returned_as_is(rng: np.random.Generator) -> None:
    image = Image.fromarray(_random_rgb(rng))
    assert load_image(image) is image


def test_grayscale_png(tmp_path: Path, rng: np.random.Generator) -> None:
    gray = rng.integers(0, 256, size=(20, 30), dtype=np.uint8)
    path = tmp_path / "gray.png"
    Image.fromarray(gray).save(path)
    image = load_image(path)
    _assert_rgb8(image, (30, 20))
    out = np.asarray(image)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], gray)


def test_rgba_png_composited_on_white(tmp_path: Path, rng: np.random.Generator) -> None:
    rgb = _random_rgb(rng, 16, 16)
    alpha = np.zeros((16, 16), dtype=np.uint8)
    alpha[:, 8:] = 255  # left half fully transparent, right half opaque
    path = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([rgb, alpha])).save(path)

    out = np.asarray(load_image(path))
    assert (out[:, :8] == 255).all()
    np.testing.assert_array_equal(out[:, 8:], rgb[:, 8:])


def test_la_image_composited_on_white() -> None:
    image = Image.new("LA", (4, 4), (10, 0))
    assert load_image(image).getpixel((0, 0)) == WHITE


def test_palette_png_with_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 200, 30, 40] + [0] * (254 * 3))
    image.paste(1, (4, 0, 8, 8))  # right half is palette index 1, left half index 0 (transparent)
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)

    out = load_image(path)
    _assert_rgb8(out, (8, 8))
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((7, 7)) == (200, 30, 40)


def test_palette_without_transparency() -> None:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 12, 34, 56] + [0] * (254 * 3))
    assert load_image(image).getpixel((0, 0)) == (12, 34, 56)


def test_rgb_with_trns_composited_on_white(tmp_path: Path) -> None:
    image = Image.new("RGB", (4, 4), (1, 2, 3))
    image.putpixel((0, 0), (9, 9, 9))
    path = tmp_path / "trns.png"
    image.save(path, transparency=(1, 2, 3))

    out = load_image(path)
    assert out.getpixel((1, 1)) == WHITE
    assert out.getpixel((0, 0)) == (9, 9, 9)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK

    out = load_image(path)
    _assert_rgb8(out, (16, 8))
    red, green, blue = out.getpixel((8, 4))
    assert red > 240 and green < 15 and blue < 15


def test_ycbcr_and_bilevel_modes() -> None:
    _assert_rgb8(load_image(Image.new("YCbCr", (5, 3))), (5, 3))
    assert load_image(Image.new("1", (5, 3), 1)).getpixel((0, 0)) == WHITE


def test_16bit_png_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[65535, 257 * 100, 0, 1000]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"  # what the test is about

    out = np.asarray(load_image(path))
    assert out.shape == (1, 4, 3)
    np.testing.assert_array_equal(out[0, :, 0], [255, 100, 0, 4])  # 1000 / 257 = 3.89 -> 4
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_32bit_int_image_scaled_from_16_bits() -> None:
    image = Image.fromarray(np.array([[65535, 257 * 100]], dtype=np.int32))
    assert image.mode == "I"
    assert [load_image(image).getpixel((x, 0)) for x in range(2)] == [WHITE, (100, 100, 100)]


def test_32bit_int_image_with_8bit_values_kept() -> None:
    image = Image.new("L", (2, 1), 200).convert("I")
    assert load_image(image).getpixel((0, 0)) == (200, 200, 200)


def test_float_image_ranges() -> None:
    unit = Image.fromarray(np.array([[1.0, 0.5, 0.0]], dtype=np.float32))
    assert [load_image(unit).getpixel((x, 0))[0] for x in range(3)] == [255, 128, 0]
    bytes_range = Image.fromarray(np.array([[255.0, 100.0, 300.0]], dtype=np.float32))
    assert [load_image(bytes_range).getpixel((x, 0))[0] for x in range(3)] == [255, 100, 255]


def test_exif_orientation_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 8, 8))  # a red square in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)

    out = load_image(path)
    _assert_rgb8(out, (20, 40))
    assert out.getpixel((16, 2)) == (255, 0, 0)  # the top-left corner is now the top-right corner
    assert out.getpixel((2, 2)) == (0, 0, 255)


def test_multi_frame_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (6, 6), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])

    out = load_image(path)
    _assert_rgb8(out, (6, 6))
    assert out.getpixel((3, 3)) == (255, 0, 0)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count open files")
def test_file_handle_closed(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "photo.png"
    Image.fromarray(_random_rgb(rng)).save(path)
    before = len(os.listdir("/proc/self/fd"))
    images = [load_image(path) for _ in range(5)]
    assert len(os.listdir("/proc/self/fd")) == before
    assert all(image.getpixel((0, 0)) == images[0].getpixel((0, 0)) for image in images)


# Bad files


def test_truncated_jpeg(tmp_path: Path, rng: np.random.Generator) -> None:
    good = tmp_path / "good.jpg"
    Image.fromarray(_random_rgb(rng, 64, 64)).save(good, quality=95)
    data = good.read_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])

    message = _assert_decode_error(path, "truncated.jpg")
    assert "truncated or corrupt" in message


def test_truncated_png(tmp_path: Path, rng: np.random.Generator) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(_random_rgb(rng, 64, 64)).save(good)
    path = tmp_path / "cut.png"
    path.write_bytes(good.read_bytes()[:200])
    assert "truncated or corrupt" in _assert_decode_error(path, "cut.png")


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.touch()
    assert "empty file (0 bytes)" in _assert_decode_error(path, "empty.jpg")


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a photo\nsecond line\n")
    assert "not a recognised image format" in _assert_decode_error(path, "notes.jpg")


def test_missing_file(tmp_path: Path) -> None:
    assert "not found" in _assert_decode_error(tmp_path / "nowhere.png", "nowhere.png")


def test_directory(tmp_path: Path) -> None:
    folder = tmp_path / "album.jpg"
    folder.mkdir()
    assert "directory" in _assert_decode_error(folder, "album.jpg")


def test_decompression_bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "huge.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels is over twice the limit: an error
    assert "decompression bomb" in _assert_decode_error(path, "huge.png")


def test_errors_are_birder_errors(tmp_path: Path) -> None:
    from birder.errors import BirderError

    with pytest.raises(BirderError):
        load_image(tmp_path / "missing.jpg")


# Extensions


@pytest.mark.parametrize("name", ["a.jpg", "a.JPEG", "b.png", "c.Bmp", "d.gif", "e.tif", "f.TIFF", "g.webp"])
def test_is_image_file_true(name: str) -> None:
    assert is_image_file(name)
    assert is_image_file(Path("/some/dir") / name)


@pytest.mark.parametrize("name", ["a.txt", "jpg", "a.jpg.part", "a", "a.heic", ".hidden"])
def test_is_image_file_false(name: str) -> None:
    assert not is_image_file(name)


def test_image_extensions_are_lower_case_with_dot() -> None:
    assert all(ext.startswith(".") and ext == ext.lower() for ext in IMAGE_EXTENSIONS)
    assert "a.jpg".endswith(IMAGE_EXTENSIONS)


# Discovery


def test_find_images_skips_hidden_entries_and_sorts_by_path_components(tmp_path: Path) -> None:
    for name in ("a-b.jpg", "a/b.JPG", "a/c/d.png", "notes.txt", "._a-b.jpg", ".thumbnails/t.jpg", "a/.git/x.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")  # only names matter: nothing is opened
    found = find_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/b.JPG", "a/c/d.png", "a-b.jpg"]
    assert is_hidden("._a.jpg") and is_hidden(".thumbnails") and not is_hidden("a.jpg")
