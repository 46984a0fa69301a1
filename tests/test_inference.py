"""infer_image / infer_batch: any photo in, probabilities and embeddings out."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_vit
from PIL import Image

import birder
from birder.errors import ImageDecodeError
from birder.inference.classification import infer_batch, infer_image


@pytest.fixture
def net():
    # Not loaded with inference=True: infer_image must still work (the reference fails here).
    return make_tiny_vit(num_classes=4, size=(32, 48)).train()


@pytest.fixture
def transform():
    return birder.classification_transform((32, 48), {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)})


def _photo(seed: int = 0, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(60, 90, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def test_infer_image_from_path_and_pil_agree(net, transform, tmp_path: Path) -> None:
    net.eval()
    photo = _photo()
    photo.save(tmp_path / "bird.png")
    (from_path, _) = infer_image(net, tmp_path / "bird.png", transform)
    (from_pil, embedding) = infer_image(net, photo, transform, return_embedding=True)
    assert from_path.shape == (1, 4) and from_path.dtype == np.float32
    np.testing.assert_allclose(from_path.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(from_path, from_pil)
    assert embedding.shape == (1, 32)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16"])
def test_any_image_mode_works(net, transform, mode: str) -> None:
    image = _photo(mode="L").convert("I;16") if mode == "I;16" else _photo(mode=mode)
    (probs, _) = infer_image(net.eval(), image, transform)
    assert probs.shape == (1, 4)
    assert np.isfinite(probs).all()


def test_runs_without_autograd(net, transform) -> None:
    assert any(p.requires_grad for p in net.parameters())
    (probs, embedding) = infer_image(net, _photo(), transform, return_embedding=True)
    assert probs.shape == (1, 4) and embedding.shape == (1, 32)


def test_logits_and_probabilities(net, transform) -> None:
    net.eval()
    (logits, _) = infer_image(net, _photo(), transform, return_logits=True)
    (probs, _) = infer_image(net, _photo(), transform)
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits), dim=1).numpy(), probs, rtol=1e-5, atol=1e-7)


def test_tta_averages_five_crops(net, transform) -> None:
    net.eval()
    batch = torch.stack([transform(_photo(seed)) for seed in range(3)])
    (probs, embedding) = infer_batch(net, batch, return_embedding=True, tta=True)
    assert probs.shape == (3, 4) and embedding.shape == (3, 32)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # Image 1 alone with TTA gives the same answer as inside the batch: no mixing of crops between images.
    (single, _) = infer_batch(net, batch[1:2], tta=True)
    np.testing.assert_allclose(single[0], probs[1], rtol=1e-4, atol=1e-6)
    (plain, _) = infer_batch(net, batch)
    assert not np.allclose(plain, probs)


def test_infer_batch_matches_per_image(net, transform) -> None:
    net.eval()
    batch = torch.stack([transform(_photo(seed)) for seed in range(4)])
    (probs, _) = infer_batch(net, batch)
    for index in range(4):
        (one, _) = infer_image(net, _photo(index), transform)
        np.testing.assert_allclose(one[0], probs[index], rtol=1e-4, atol=1e-6)


def test_bfloat16_network_accepts_float_inputs(net, transform) -> None:
    net = net.eval().to(torch.bfloat16)
    (probs, _) = infer_image(net, _photo(), transform)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-3)


def test_bad_files_are_clear_errors(net, transform, tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").touch()
    (tmp_path / "notes.jpg").write_text("not a photo")
    with pytest.raises(ImageDecodeError, match="empty file"):
        infer_image(net, tmp_path / "empty.jpg", transform)
    with pytest.raises(ImageDecodeError, match="not a recognised image format"):
        infer_image(net, tmp_path / "notes.jpg", transform)
