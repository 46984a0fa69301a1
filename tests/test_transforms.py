"""Tests of birder.data.transforms: parity with the published Birder's preprocessing, and the TTA crops."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from birder.data.transforms import RGB_STATS, classification_transform, tta_crops
from birder.io.images import load_image

FIXTURES = Path(__file__).parent / "fixtures"
MODELS = ["current_vit_small", "current_vit_reg4_small", "legacy_vit_small"]
# reference key -> (center_crop, simple_crop)
VARIANTS = {
    "photo_tensor": (1.0, False),
    "photo_tensor_crop0.875_simple0": (0.875, False),
    "photo_tensor_crop0.875_simple1": (0.875, True),
}
TOLERANCE = 1e-5


def _checkpoint_metadata(model: str) -> dict:
    return json.loads((FIXTURES / f"{model}_info.json").read_text())["checkpoint_metadata"]


@pytest.mark.parametrize("key", list(VARIANTS))
@pytest.mark.parametrize("model", MODELS)
def test_matches_reference(model: str, key: str) -> None:
    metadata = _checkpoint_metadata(model)
    size = tuple(metadata["signature"]["inputs"][0]["data_shape"][2:4])
    reference = torch.load(FIXTURES / f"{model}_reference.pt", weights_only=True)[key]
    center_crop, simple_crop = VARIANTS[key]

    transform = classification_transform(size, metadata["rgb_stats"], center_crop=center_crop, simple_crop=simple_crop)
    output = transform(load_image(FIXTURES / f"{model}_photo.png"))

    assert output.dtype == torch.float32
    assert output.shape == (3, *size)
    assert output.shape == reference.shape
    assert (output - reference).abs().max().item() <= TOLERANCE


def test_aspect_ratio_not_kept_without_simple_crop() -> None:
    # A 2:1 image squeezed to a square: the left and right halves stay separate colours edge to edge
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    image.paste((0, 0, 255), (100, 0, 200, 100))
    out = classification_transform((32, 32), RGB_STATS["neutral"])(image)
    assert out.shape == (3, 32, 32)
    assert out[0, 16, 0] == 1.0 and out[2, 16, 31] == 1.0


def test_simple_crop_keeps_aspect_ratio() -> None:
    # Shorter side to 32: the 2:1 image becomes 64x32 and the centre crop sees only the middle half
    image = Image.new("RGB", (200, 100), (0, 255, 0))
    image.paste((255, 0, 0), (0, 0, 25, 100))  # becomes the 8 leftmost columns, far from the crop
    out = classification_transform((32, 32), RGB_STATS["neutral"], simple_crop=True)(image)
    assert torch.allclose(out[1], torch.ones(32, 32))


def test_rgb_stats_tuples_and_lists_agree() -> None:
    image = Image.new("RGB", (50, 40), (10, 120, 240))
    as_tuples = classification_transform((24, 24), RGB_STATS["birder"])(image)
    as_lists = classification_transform((24, 24), {key: list(v) for key, v in RGB_STATS["birder"].items()})(image)
    assert torch.equal(as_tuples, as_lists)
    expected = (240 / 255 - RGB_STATS["birder"]["mean"][2]) / RGB_STATS["birder"]["std"][2]
    assert out_close(as_tuples[2], expected)


def out_close(tensor: torch.Tensor, value: float) -> bool:
    return torch.allclose(tensor, torch.full_like(tensor, value), atol=1e-5)


def test_presets_have_three_channel_stats() -> None:
    assert set(RGB_STATS) == {"birder", "birder_legacy", "imagenet", "neutral", "centered"}
    for stats in RGB_STATS.values():
        assert len(stats["mean"]) == 3 and len(stats["std"]) == 3
    assert RGB_STATS["imagenet"]["mean"] == (0.485, 0.456, 0.406)


def test_transform_converts_other_modes_and_rejects_paths(tmp_path: Path) -> None:
    transform = classification_transform((16, 16), RGB_STATS["centered"])
    gray = transform(Image.new("L", (20, 20), 255))
    torch.testing.assert_close(gray, torch.ones(3, 16, 16))
    with pytest.raises(TypeError, match="load_image"):
        transform(tmp_path / "photo.jpg")


def test_transform_repr_is_readable() -> None:
    text = repr(classification_transform((48, 80), RGB_STATS["birder"], center_crop=0.875))
    assert text.startswith("ClassificationTransform(size=(48, 80), center_crop=0.875")
    assert "bicubic" in text and "0.5191" in text


@pytest.mark.parametrize("simple_crop", [False, True])
@pytest.mark.parametrize("center_crop", [1.0, 0.875, 1.25])
@pytest.mark.parametrize("image_size", [(101, 55), (40, 130), (64, 64), (17, 300)])
def test_same_arithmetic_as_torchvision(image_size: tuple[int, int], center_crop: float, simple_crop: bool) -> None:
    # torchvision is the reference's preprocessing; ours avoids importing it. Zero padding (crop larger than the
    # resized image: center_crop > 1, or simple_crop on an extreme aspect ratio) included.
    from torchvision.transforms import v2

    size = (48, 80)
    stats = RGB_STATS["birder"]
    target = int(min(size) / center_crop) if simple_crop else (int(size[0] / center_crop), int(size[1] / center_crop))
    reference = v2.Compose(
        [
            v2.Resize(target, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(stats["mean"]), std=list(stats["std"])),
        ]
    )
    pixels = np.random.default_rng(sum(image_size)).integers(0, 256, (image_size[1], image_size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    ours = classification_transform(size, stats, center_crop=center_crop, simple_crop=simple_crop)(image)
    assert (ours - reference(image)).abs().max().item() <= TOLERANCE


def test_tta_crops_match_torchvision() -> None:
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as tvf

    batch = torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(0))
    crops = torch.stack(tvf.five_crop(batch, [38, 64]), dim=1).flatten(0, 1)
    expected = tvf.resize(crops, [48, 80], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    torch.testing.assert_close(tta_crops(batch), expected)


def test_invalid_center_crop() -> None:
    with pytest.raises(ValueError, match="center_crop"):
        classification_transform((16, 16), RGB_STATS["birder"], center_crop=0)


def test_tta_crops_shapes() -> None:
    single = torch.randn(3, 48, 80)
    assert tta_crops(single).shape == (5, 3, 48, 80)
    batch = torch.randn(2, 3, 64, 64)
    assert tta_crops(batch).shape == (10, 3, 64, 64)


def test_tta_crops_order_is_image_major() -> None:
    # Image 0 is all zeros, image 1 all ones: rows 0-4 are views of image 0, rows 5-9 of image 1
    batch = torch.stack([torch.zeros(3, 20, 20), torch.ones(3, 20, 20)])
    crops = tta_crops(batch)
    assert torch.allclose(crops[:5], torch.zeros(5, 3, 20, 20))
    assert torch.allclose(crops[5:], torch.ones(5, 3, 20, 20))


def test_tta_crops_are_the_five_corners_and_centre() -> None:
    # A distinct value in each 4x4 corner tells which crop each view is (torchvision's five-crop order).
    # Crops are 32x32 of 40x40: the corner crops start at 0 or 8, the centre crop spans 4..36 and sees no corner.
    image = torch.zeros(1, 40, 40)
    image[:, :4, :4] = 1.0
    image[:, :4, -4:] = 2.0
    image[:, -4:, :4] = 3.0
    image[:, -4:, -4:] = 4.0
    crops = tta_crops(image)
    for index, value in enumerate([1.0, 2.0, 3.0, 4.0]):
        assert (crops[index] - value).abs().min() < 0.05
        assert crops[index].max() < value + 0.5  # and no other corner's value
    assert crops[4].abs().max() < 0.05


def test_tta_crops_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        tta_crops(torch.randn(40, 40))
