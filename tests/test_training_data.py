"""Training data: file discovery (folders, ImageFolder, CSV), unreadable images, seeded augmentation, sampling.

Also home of the generated data sets the other training tests import (``make_image_folder``, ``single_thread``).
"""

from collections import Counter
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_torch_thread
from PIL import Image

from birder.data.training import (
    UNLABELED,
    DataError,
    EpochSampler,
    ImageDataset,
    class_balanced_weights,
    collate_training_samples,
    csv_files,
    image_folder_files,
    list_images,
    mim_transform,
    training_transform,
)
from birder.data.transforms import RGB_STATS

# One colour and stripe pattern per class: separable by a tiny ViT after a few steps.
CLASS_STYLES = [((215, 45, 40), 0), ((40, 190, 70), 4), ((45, 60, 215), 8), ((225, 215, 50), 0)]
STATS = RGB_STATS["neutral"]


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one thread avoids oversubscription (50x slower small ops).

    Module-scoped, so that module-scoped fixtures (reference runs) use the same thread count as the tests: float
    results of a reduction depend on how it is split across threads."""
    with one_torch_thread():
        yield


def make_image(style: tuple[tuple[int, int, int], int], rng: np.random.Generator, size: int = 40) -> Image.Image:
    (colour, stripe) = style
    pixels = np.array(colour, dtype=np.float64)[None, None, :] + rng.normal(0, 20, (size, size, 3))
    if stripe:
        pixels[::stripe] = 255 - pixels[::stripe]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_image_folder(root: Path, per_class: int, *, classes: int = 4, seed: int = 0, size: int = 40) -> Path:
    """``root/class_<k>/<i>.png``, seeded."""
    rng = np.random.default_rng(seed)
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_image(CLASS_STYLES[label], rng, size).save(folder / f"{i}.png")

    return root


def make_split_dataset(root: Path, train_per_class: int = 12, val_per_class: int = 6, classes: int = 4) -> Path:
    """``root/train/<class>/`` and ``root/val/<class>/`` with different images (a held-out split)."""
    make_image_folder(root / "train", train_per_class, classes=classes, seed=0)
    make_image_folder(root / "val", val_per_class, classes=classes, seed=1)
    return root


def test_list_images_is_recursive_sorted_and_reports_empty_folders(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "a", 2, classes=2)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    found = list_images([tmp_path / "a"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a/class_0/0.png",
        "a/class_0/1.png",
        "a/class_1/0.png",
        "a/class_1/1.png",
    ]

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no image files"):
        list_images([tmp_path / "a", tmp_path / "empty"])
    with pytest.raises(DataError, match="no such directory"):
        list_images([tmp_path / "missing"])


def test_image_folder_classes_and_validation_mapping(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "train", 2, classes=3)
    train = image_folder_files(tmp_path / "train")
    assert train.class_to_idx == {"class_0": 0, "class_1": 1, "class_2": 2}
    assert Counter(train.targets) == {0: 2, 1: 2, 2: 2}

    make_image_folder(tmp_path / "val", 1, classes=2)  # a class missing from val is fine
    val = image_folder_files(tmp_path / "val", train.class_to_idx)
    assert val.class_to_idx == train.class_to_idx and sorted(val.targets) == [0, 1]

    make_image_folder(tmp_path / "other", 1, classes=1)
    (tmp_path / "other" / "class_0").rename(tmp_path / "other" / "heron")
    with pytest.raises(DataError, match="not in the training set: heron"):
        image_folder_files(tmp_path / "other", train.class_to_idx)
    with pytest.raises(DataError, match="no class folders"):
        image_folder_files(tmp_path / "train" / "class_0")  # images, but no class sub-folders
    with pytest.raises(DataError, match="no such directory"):
        image_folder_files(tmp_path / "nothing")


def test_csv_labels(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "img", 1, classes=2)
    (tmp_path / "labels.csv").write_text("path,label\nimg/class_0/0.png,robin\nimg/class_1/0.png,wren\n")
    files = csv_files(tmp_path / "labels.csv")
    assert files.class_to_idx == {"robin": 0, "wren": 1}
    assert files.paths == [tmp_path / "img/class_0/0.png", tmp_path / "img/class_1/0.png"]
    assert files.targets == [0, 1]

    (tmp_path / "bad.csv").write_text("img/class_0/0.png\n")
    with pytest.raises(DataError, match=r"bad.csv:1: expected 'path,label'"):
        csv_files(tmp_path / "bad.csv")
    (tmp_path / "val.csv").write_text("img/class_0/0.png,owl\n")
    with pytest.raises(DataError, match="not in the training set: owl"):
        csv_files(tmp_path / "val.csv", files.class_to_idx)


def test_unreadable_images_are_replaced_in_training_and_dropped_in_evaluation(tmp_path: Path) -> None:
    make_image_folder(tmp_path, 2, classes=1)
    broken = tmp_path / "class_0" / "0b_broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    paths = sorted((tmp_path / "class_0").iterdir())  # 0.png, 0b_broken.jpg, 1.png
    transform = training_transform((32, 32), STATS, level=1)

    train = ImageDataset(paths, transform, [0, 1, 2])
    sample = train[(1, 1)]
    assert sample.index == 1 and sample.target == 2  # the next readable image, with its own label
    assert len(sample.unreadable) == 1 and str(broken) in sample.unreadable[0]

    evaluation = ImageDataset(paths, transform, [0, 1, 2], replace_unreadable=False)
    batch = collate_training_samples([evaluation[i] for i in range(3)])
    assert batch.indices.tolist() == [0, 2] and batch.images.shape == (2, 3, 32, 32)
    assert len(batch.unreadable) == 1 and "0b_broken.jpg" in batch.unreadable[0]
    assert collate_training_samples([evaluation[1]]).indices.numel() == 0


def test_augmentation_is_seeded_by_sample_and_epoch_not_by_the_global_stream(tmp_path: Path) -> None:
    make_image_folder(tmp_path, 2, classes=1)
    dataset = ImageDataset(list_images([tmp_path]), mim_transform((32, 32), STATS, 0.3), seed=7)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = dataset[(3, 1)].image
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random stream is untouched
    torch.manual_seed(123)
    assert torch.equal(dataset[(3, 1)].image, first)
    assert not torch.equal(dataset[(4, 1)].image, first)
    assert dataset[0].target == UNLABELED


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_training_transform_levels(level: int) -> None:
    image = make_image(CLASS_STYLES[1], np.random.default_rng(0), 50)
    assert training_transform((32, 24), STATS, level)(image).shape == (3, 32, 24)


def test_epoch_sampler_order_sharding_and_mid_epoch_start() -> None:
    single = EpochSampler(10, seed=3)
    single.set_epoch(2)
    order = [index for (_, index) in single]
    assert sorted(order) == list(range(10))
    assert order == single.epoch_order(2) and order != single.epoch_order(3)
    single.set_epoch(2, start=4)
    assert [index for (_, index) in single] == order[4:] and len(single) == 6

    ranks = [EpochSampler(10, seed=3, rank=r, world_size=3) for r in range(3)]
    shards = [sampler.epoch_order(2) for sampler in ranks]
    assert [len(shard) for shard in shards] == [4, 4, 4]  # padded: every rank takes as many steps
    assert set(chain.from_iterable(shards)) == set(range(10))

    evaluation = [EpochSampler(10, shuffle=False, rank=r, world_size=3, pad=False) for r in range(3)]
    assert sorted(chain.from_iterable(s.epoch_order(0) for s in evaluation)) == list(range(10))  # each image once


def test_class_balanced_sampling() -> None:
    targets = [0] * 90 + [1] * 10
    sampler = EpochSampler(len(targets), seed=0, weights=class_balanced_weights(targets))
    drawn = Counter(targets[i] for epoch in range(20) for i in sampler.epoch_order(epoch))
    assert 0.4 < drawn[1] / sum(drawn.values()) < 0.6


def test_training_and_prediction_find_the_same_photos(tmp_path: Path) -> None:
    from birder.inference.dataset import discover_images

    root = make_image_folder(tmp_path / "birds", 2, classes=2)
    # What a camera card copied from a Mac holds beside the photos: AppleDouble files and thumbnail folders
    (root / "class_0" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    for hidden in (root / "class_1" / ".thumbnails", root / ".thumbnails"):
        hidden.mkdir()
        make_image(CLASS_STYLES[0], np.random.default_rng(9)).save(hidden / "x.png")

    expected = ["class_0/0.png", "class_0/1.png", "class_1/0.png", "class_1/1.png"]
    training = [p.relative_to(root).as_posix() for p in list_images([root])]
    labeled = image_folder_files(root)
    prediction = [p.relative_to(root).as_posix() for p in discover_images([root])]
    assert training == prediction == [p.relative_to(root).as_posix() for p in labeled.paths] == expected
    assert labeled.class_to_idx == {"class_0": 0, "class_1": 1}  # a hidden folder is no class either
