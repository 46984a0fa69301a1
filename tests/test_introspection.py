"""Explanation maps: attention rollout and Grad-CAM/LayerCAM on ViTs, mapped back onto the photo."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VIT_CONFIG
from field_data import fit_with_flips
from PIL import Image

from benchmarks.synthetic import make_scene
from birder.data.transforms import classification_transform
from birder.errors import BirderError
from birder.introspection import explain, explain_tensor
from birder.introspection.explain import map_to_photo
from birder.introspection.overlay import save_overlay
from birder.model_registry import registry

STATS = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
SCENE_CLASSES = [0, 9, 18, 27]  # four shapes in four colour pairs
SCENE_AREA = (0.10, 0.25)


def tiny_vit(size=(32, 32), **config) -> torch.nn.Module:
    torch.manual_seed(0)
    net = registry.net_factory("vit_b16", 4, config={**TINY_VIT_CONFIG, "patch_size": 8, **config}, size=size)
    return net.eval()


@pytest.mark.parametrize(
    ("config", "size"),
    [({}, (32, 32)), ({"num_reg_tokens": 4}, (32, 48)), ({"class_token": False}, (48, 32))],
    ids=["class-token", "registers-non-square", "avg-pool-non-square"],
)
def test_maps_for_every_variant_and_the_fast_path_is_untouched(config, size) -> None:
    net = tiny_vit(size, **config)
    inputs = torch.randn(2, 3, *size)
    with torch.no_grad():
        before = net(inputs)
    for method in ("rollout", "hirescam", "gradcam", "layercam"):
        (maps, probabilities) = explain_tensor(net, inputs, method)
        assert maps.shape == (2, *size) and probabilities.shape == (2, 4)
        assert float(maps.min()) >= 0.0 and float(maps.max()) == pytest.approx(1.0)
    with torch.no_grad():
        after = net(inputs)
    assert torch.equal(before, after)  # nothing left switched on: the SDPA path, bit for bit
    assert all(not block.attn.record_attention and block.attn.attention_weights is None for block in net.encoder.block)

    # The explicit attention computes what the fused kernel does
    for block in net.encoder.block:
        block.attn.record_attention = True
    with torch.no_grad():
        assert torch.allclose(net(inputs), before, atol=1e-5)


def test_map_goes_back_through_resize_and_crop() -> None:
    # A photo 100 x 200 (H x W); the model sees 32 x 32
    one_hot = np.zeros((32, 32), dtype=np.float32)
    one_hot[16, 16] = 1.0
    # Plain resize: the input centre is the photo centre
    plain = map_to_photo(one_hot, (100, 200), classification_transform((32, 32), STATS))
    assert np.unravel_index(plain.argmax(), plain.shape) == pytest.approx((51, 103), abs=4)
    # Shorter side to 32/0.5 = 64 (64 x 128), centre crop 32 x 32 at (16, 48): only the middle of the photo is seen
    crop = classification_transform((32, 32), STATS, center_crop=0.5, simple_crop=True)
    mapped = map_to_photo(one_hot, (100, 200), crop)
    (y, x) = np.unravel_index(mapped.argmax(), mapped.shape)
    assert abs(y - 50) <= 3 and abs(x - 100) <= 3
    seen = map_to_photo(np.ones((32, 32), np.float32), (100, 200), crop) > 0
    (rows, cols) = np.nonzero(seen)
    assert (rows.min(), rows.max()) == pytest.approx((25, 74), abs=1)  # 32 px of 64 -> half of the 100 rows
    assert (cols.min(), cols.max()) == pytest.approx((75, 124), abs=1)  # 32 px of 128 -> a quarter of 200 columns


def test_explain_a_photo_and_write_an_overlay(tmp_path: Path) -> None:
    net = tiny_vit((32, 48))
    photo = Image.new("RGB", (90, 60), (40, 120, 40))
    result = explain(net, photo, classification_transform((32, 48), STATS), method="gradcam", target=2)
    assert result.target == 2 and result.input_map.shape == (32, 48) and result.photo_map.shape == (60, 90)
    path = save_overlay(tmp_path / "overlay.png", photo, result.photo_map, "class_2 0.31")
    assert Image.open(path).size == (90, 60)
    with pytest.raises(BirderError, match="unknown explanation method"):
        explain(net, photo, classification_transform((32, 48), STATS), method="saliency")


# ---------------------------------------------------------------------------------------------------------------------
# The pointing game on a trained model
# ---------------------------------------------------------------------------------------------------------------------


def scenes(rng: np.random.Generator, count: int, size: int) -> list:
    return [
        make_scene(rng, size=(size, size), classes=SCENE_CLASSES, num_objects=(1, 1), area_range=SCENE_AREA)
        for _ in range(count)
    ]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """PyTorch on one thread: the trained model does not depend on the machine's core count, and on a machine
    shared with other work the many small operations of a tiny network do not wait at barriers for a second thread
    (there the pointing game's 300 explanations took more than 3 minutes with two threads, 3 seconds with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_scene_classifier(size: int = 64, count: int = 2000, epochs: int = 12) -> torch.nn.Module:
    """A 4-block ViT trained on scenes of one object each, the class being the object's (a plain torch loop).

    The settings (2,000 scenes, 12 epochs) were chosen on validation scenes (seeds 2 to 9) by the pointing game of
    the three methods, never on the held-out scenes of the test below (seed 1)."""
    torch.manual_seed(0)
    config = {"hidden_dim": 64, "num_layers": 4, "num_heads": 4, "mlp_dim": 128, "patch_size": 8}
    net = registry.net_factory("vit_b16", len(SCENE_CLASSES), config=config, size=(size, size))
    transform = classification_transform((size, size), STATS)
    train = scenes(np.random.default_rng(0), count, size)
    inputs = torch.stack([transform(scene.image) for scene in train])
    labels = torch.tensor([SCENE_CLASSES.index(scene.labels[0]) for scene in train])
    # OneCycleLR's default warm-up share (0.3), full batches only, torch's global RNG (seeded above)
    return fit_with_flips(net, inputs, labels, epochs=epochs, lr=2e-3, batch_size=32, pct_start=0.3, drop_last=True)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_pointing_game_on_held_out_scenes() -> None:
    net = train_scene_classifier()
    held_out = scenes(np.random.default_rng(1), 100, 64)
    # Photos larger than the input and not square: the maps are read on the photo, through the transform
    photos = [scene.image.resize((96, 80), Image.Resampling.BICUBIC) for scene in held_out]
    transform = classification_transform((64, 64), STATS)
    rates = {}
    for method in ("rollout", "hirescam", "gradcam", "layercam"):
        hits = correct = 0
        for scene, photo in zip(held_out, photos, strict=True):
            result = explain(net, photo, transform, method=method)
            (y, x) = np.unravel_index(result.photo_map.argmax(), result.photo_map.shape)
            (bx, by, bw, bh) = scene.boxes[0]
            (sx, sy) = (96 / 64, 80 / 64)
            hits += bx * sx <= x < (bx + bw) * sx and by * sy <= y < (by + bh) * sy
            correct += SCENE_CLASSES[result.target] == scene.labels[0]
        rates[method] = hits / len(held_out)
    print(f"pointing game: {rates}; accuracy {correct / len(held_out):.2f}")
    assert correct / len(held_out) >= 0.8
    # The two methods of the issue: rollout and Grad-CAM in its token-resolved form (HiResCAM); classic Grad-CAM's
    # token-averaged weights wash out where the class token looked (birder/introspection/gradcam.py), so its figure
    # is printed, not held to the target; LayerCAM is held to it too
    assert rates["rollout"] >= 0.8 and rates["hirescam"] >= 0.8 and rates["layercam"] >= 0.8


def test_predict_writes_an_overlay_per_photo(tmp_path: Path) -> None:
    import birder
    from birder.scripts import predict

    net = tiny_vit((32, 32))
    birder.save_model(net, tmp_path / "tiny.pt", birder.ModelInfo({f"class_{i}": i for i in range(4)}, None, STATS))
    photos = tmp_path / "photos"  # the overlays go beside it: inside it they would be read as photos next time
    photos.mkdir()
    for index in range(3):
        Image.new("RGB", (40 + 10 * index, 30), (20 * index, 90, 30)).save(photos / f"{index}.png")
    (photos / "broken.jpg").write_bytes(b"not an image")
    argv = [str(photos), "--weights", str(tmp_path / "tiny.pt"), "-j", "0", "--no-progress"]
    argv += ["--output-dir", str(tmp_path / "out"), "--explain", str(tmp_path / "maps")]
    assert predict.main(argv) == 0
    overlays = sorted((tmp_path / "maps").glob("*.png"))
    assert len(overlays) == 3 and Image.open(overlays[0]).size in {(40, 30), (50, 30), (60, 30)}
