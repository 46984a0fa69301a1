"""Training data: image lists (folders, ImageFolder layouts, CSV files), augmentations, a resumable sampler.

Three properties the trainers rely on:

- **Reproducible augmentation.** A sample's random crop/flip/jitter is seeded by ``(seed, epoch, index)``, not by
  whichever worker happened to load it, so a resumed run sees exactly the images an uninterrupted one would.
- **Resumable order.** :class:`EpochSampler` gives each epoch a fixed order (a function of the seed and the epoch),
  shards it across distributed ranks and can start in the middle of an epoch.
- **Unreadable images never stop an epoch.** A file that fails to decode is reported (its path travels with the
  batch, so the main process can warn once and count it) and replaced by the next readable one in training, or
  dropped in evaluation.
"""

import contextlib
import csv
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import v2

from birder.errors import BirderError, ImageDecodeError
from birder.io.images import find_images, is_hidden, load_image

logger = logging.getLogger(__name__)

UNLABELED = -1
# A sample key: a plain index, or (epoch, index) so that augmentation can be seeded per epoch.
SampleKey = int | tuple[int, int]


class DataError(BirderError):
    """A dataset a user pointed at that cannot be used (missing, empty, inconsistent)."""


# Finding images


def list_images(roots: Sequence[str | Path]) -> list[Path]:
    """Every image file under each root, recursively, in a stable (sorted) order.

    The same discovery as ``birder-predict`` (:func:`~birder.io.images.find_images`): hidden files such as macOS's
    "._IMG_0001.jpg" and hidden folders such as ".thumbnails" are skipped, so a model is trained on the photos it
    would be asked to classify.
    """
    images: list[Path] = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise DataError(f"{root}: no such directory")

        found = find_images(root)
        if not found:
            raise DataError(f"{root}: no image files found (looked recursively for .jpg, .png, .webp, ...)")
        images += found

    return images


@dataclass(frozen=True)
class LabeledFiles:
    paths: list[Path]
    targets: list[int]
    class_to_idx: dict[str, int]


def image_folder_files(root: str | Path, class_to_idx: Mapping[str, int] | None = None) -> LabeledFiles:
    """An ImageFolder layout: ``root/<class name>/**/<image>``.

    Classes are the sorted sub-folder names that hold images, unless ``class_to_idx`` is given (a validation
    folder must use the training classes: one it does not know is an error, a missing one is fine). Hidden folders
    are no classes, and each class's images are found as :func:`list_images` finds them.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory (expected one sub-folder of images per class)")

    per_class: dict[str, list[Path]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden(p.name)):
        images = find_images(folder)
        if images:
            per_class[folder.name] = images
        else:
            logger.warning("%s: no images, class ignored", folder)

    if not per_class:
        raise DataError(f"{root}: no class folders with images (expected {root}/<class name>/<image files>)")

    if class_to_idx is None:
        class_to_idx = {name: idx for idx, name in enumerate(sorted(per_class))}
    else:
        unknown = sorted(set(per_class) - set(class_to_idx))
        if unknown:
            raise DataError(f"{root}: classes not in the training set: {', '.join(unknown[:10])}")

    paths = [path for name in per_class for path in per_class[name]]
    targets = [class_to_idx[name] for name in per_class for _ in per_class[name]]
    return LabeledFiles(paths, targets, dict(class_to_idx))


def csv_files(csv_path: str | Path, class_to_idx: Mapping[str, int] | None = None) -> LabeledFiles:
    """Labels from a CSV file of ``path,label`` rows (a header row is optional).

    Relative paths are relative to the CSV file's folder. Classes are the sorted labels unless ``class_to_idx``
    is given. Missing image files are not checked here: like unreadable ones, they are skipped with a warning.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: no such CSV file")

    rows: list[tuple[Path, str]] = []
    with open(csv_path, newline="", encoding="utf-8") as handle:
        for line_number, row in enumerate(csv.reader(handle), start=1):
            if not row or (line_number == 1 and [cell.strip().lower() for cell in row[:2]] == ["path", "label"]):
                continue
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise DataError(f"{csv_path}:{line_number}: expected 'path,label', got {','.join(row)!r}")
            path = Path(row[0].strip())
            rows.append((path if path.is_absolute() else csv_path.parent / path, row[1].strip()))

    if not rows:
        raise DataError(f"{csv_path}: no 'path,label' rows")

    labels = sorted({label for _, label in rows})
    if class_to_idx is None:
        class_to_idx = {label: idx for idx, label in enumerate(labels)}
    else:
        unknown = sorted(set(labels) - set(class_to_idx))
        if unknown:
            raise DataError(f"{csv_path}: labels not in the training set: {', '.join(unknown[:10])}")

    return LabeledFiles([path for path, _ in rows], [class_to_idx[label] for _, label in rows], dict(class_to_idx))


# Transforms


def _normalize(rgb_stats: Mapping[str, Sequence[float]]) -> list[v2.Transform]:
    return [
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(rgb_stats["mean"]), std=list(rgb_stats["std"])),
    ]


def mim_transform(
    size: tuple[int, int], rgb_stats: Mapping[str, Sequence[float]], min_scale: float = 0.3
) -> Callable[[Image.Image], torch.Tensor]:
    """MAE pretraining augmentation: random resized crop (area ``min_scale``..1) and horizontal flip."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=v2.InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip(),
            *_normalize(rgb_stats),
        ]
    )


@dataclass(frozen=True)
class AugLevel:
    min_scale: float | None  # random resized crop area range (None: plain resize, no crop)
    jitter: float  # brightness / contrast / saturation strength
    rotation: float  # degrees
    erasing: float  # random erasing probability


# Training augmentation levels: 0 none, 1 light, 2 default, 3 strong (long fine-tuning runs, small data sets).
AUG_LEVELS = {
    0: AugLevel(min_scale=None, jitter=0.0, rotation=0.0, erasing=0.0),
    1: AugLevel(min_scale=0.6, jitter=0.0, rotation=0.0, erasing=0.0),
    2: AugLevel(min_scale=0.35, jitter=0.2, rotation=10.0, erasing=0.0),
    3: AugLevel(min_scale=0.2, jitter=0.3, rotation=15.0, erasing=0.25),
}


def training_transform(
    size: tuple[int, int], rgb_stats: Mapping[str, Sequence[float]], level: int = 2
) -> Callable[[Image.Image], torch.Tensor]:
    """Supervised training augmentation of the given level (see :data:`AUG_LEVELS`)."""
    if level not in AUG_LEVELS:
        raise DataError(f"augmentation level must be one of {sorted(AUG_LEVELS)}, got {level}")

    aug = AUG_LEVELS[level]
    bicubic = v2.InterpolationMode.BICUBIC
    steps: list[v2.Transform] = []
    if aug.rotation:
        steps.append(v2.RandomRotation(aug.rotation, interpolation=v2.InterpolationMode.BILINEAR))
    if aug.min_scale is None:
        steps.append(v2.Resize(size, interpolation=bicubic))
    else:
        steps += [v2.RandomResizedCrop(size, scale=(aug.min_scale, 1.0), interpolation=bicubic)]
        steps.append(v2.RandomHorizontalFlip())
    if aug.jitter:
        steps.append(v2.ColorJitter(brightness=aug.jitter, contrast=aug.jitter, saturation=aug.jitter))
    steps += _normalize(rgb_stats)
    if aug.erasing:
        steps.append(v2.RandomErasing(p=aug.erasing, value=0))

    return v2.Compose(steps)


# Datasets


class TrainingSample(NamedTuple):
    """One item of :class:`ImageDataset`: a transformed image and its label, or why it was dropped."""

    index: int  # the index that was asked for
    image: torch.Tensor | None  # None: unreadable and dropped (evaluation)
    target: int
    unreadable: tuple[str, ...]  # one message per file that failed to decode, naming it


class TrainingBatch(NamedTuple):
    """A collated batch of :class:`TrainingSample` s (:func:`collate_training_samples`)."""

    indices: torch.Tensor  # [B] sample indices (as asked for: a replaced unreadable image keeps its slot)
    images: torch.Tensor  # [B, C, H, W]
    targets: torch.Tensor  # [B]; UNLABELED for unlabeled images
    unreadable: list[str]


def load_readable(
    paths: Sequence[Path], index: int, *, replace: bool
) -> tuple[int, Image.Image | None, tuple[str, ...]]:
    """Decode ``paths[index]``. A file that fails is replaced by the next readable one (``replace``, training: the
    batch keeps its size) or dropped (the image is None). Returns the position read, the image and one message per
    unreadable file met; none readable at all is an error."""
    unreadable: list[str] = []
    for offset in range(len(paths)):
        position = (index + offset) % len(paths)
        try:
            return (position, load_image(paths[position]), tuple(unreadable))
        except ImageDecodeError as err:
            unreadable.append(str(err))
            if not replace:
                return (index, None, tuple(unreadable))

    raise DataError(f"none of the {len(paths)} images could be read (first: {unreadable[0]})")


@contextlib.contextmanager
def sample_seed(seed: int, epoch: int | None, item: int) -> Iterator[None]:
    """Seed the augmentation of one sample by the sample itself, without disturbing the caller's random stream: the
    same image gets the same crop in epoch ``epoch`` whichever worker, rank or resumed run loads it.

    Only the CPU generator is seeded (``torch.manual_seed`` would also queue seeds for every accelerator).
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(hash((seed, epoch, item)) & 0x7FFF_FFFF_FFFF_FFFF)
        yield


class ImageDataset(Dataset):
    """Images (with optional integer labels) decoded by the package's one decoder, then transformed.

    ``replace_unreadable``: in training an unreadable image is replaced by the next readable one (the batch keeps
    its size, so distributed ranks stay in step); in evaluation it is dropped.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        transform: Callable[[Image.Image], torch.Tensor],
        targets: Sequence[int] | None = None,
        *,
        replace_unreadable: bool = True,
        seed: int = 0,
    ) -> None:
        if targets is not None and len(targets) != len(paths):
            raise ValueError("paths and targets differ in length")

        self.paths = list(paths)
        self.targets = list(targets) if targets is not None else [UNLABELED] * len(self.paths)
        self.transform = transform
        self.replace_unreadable = replace_unreadable
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: SampleKey) -> TrainingSample:
        (epoch, index) = key if isinstance(key, tuple) else (None, key)
        (position, image, unreadable) = load_readable(self.paths, index, replace=self.replace_unreadable)
        if image is None:
            return TrainingSample(index, None, self.targets[index], unreadable)

        return TrainingSample(index, self._transform(image, epoch, position), self.targets[position], unreadable)

    def _transform(self, image: Image.Image, epoch: int | None, position: int) -> torch.Tensor:
        if epoch is None:
            return self.transform(image)

        with sample_seed(self.seed, epoch, position):
            return self.transform(image)


def collate_training_samples(samples: Sequence[TrainingSample]) -> TrainingBatch:
    """Stack the readable samples; the unreadable ones' messages travel along for the main process to report."""
    kept = [sample for sample in samples if sample.image is not None]
    unreadable = [message for sample in samples for message in sample.unreadable]
    if not kept:
        return TrainingBatch(
            torch.empty(0, dtype=torch.long), torch.empty(0), torch.empty(0, dtype=torch.long), unreadable
        )

    return TrainingBatch(
        torch.tensor([sample.index for sample in kept]),
        torch.stack([sample.image for sample in kept]),
        torch.tensor([sample.target for sample in kept]),
        unreadable,
    )


# Sampling


class EpochBatches(Protocol):
    """Where a trainer's epochs come from: files and a sampler (:class:`~birder.training.setup.IndexedEpochs`) or
    a stream of tar shards (:class:`~birder.data.shards.ShardStream`)."""

    batch_size: int

    @property
    def samples_per_rank(self) -> int:
        """Samples this rank sees in a whole epoch (what schedules are planned with)."""
        ...

    def loader(self, epoch: int, skip_batches: int, workers: int, device: torch.device) -> Iterable[TrainingBatch]:
        """Epoch ``epoch``'s batches for this rank, without its first ``skip_batches`` (a mid-epoch resume)."""
        ...


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of epoch ``epoch``'s order (of samples, or of shards): a function of ``(seed, epoch)`` only,
    the same on every rank and in a resumed run."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class EpochSampler(Sampler[tuple[int, int]]):
    """A fixed order per epoch, sharded across ranks, that can start mid-epoch; yields ``(epoch, index)`` keys.

    The order of epoch ``e`` depends only on ``(seed, e)``: a shuffle, the dataset order (``shuffle=False``), or
    ``len(weights)`` draws with replacement (class-balanced sampling). Rank ``r`` takes every ``world_size``-th
    entry starting at ``r``. With ``pad`` (training), the order is padded by wrapping around so every rank gets
    the same number of samples (and of optimizer steps); without it (evaluation) nothing is seen twice.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        weights: Sequence[float] | None = None,
        pad: bool = True,
    ) -> None:
        if num_samples <= 0:
            raise DataError("cannot sample from an empty dataset")

        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.weights = torch.as_tensor(weights, dtype=torch.float64) if weights is not None else None
        self.pad = pad
        self.epoch = 0
        self.start = 0

    @property
    def samples_per_rank(self) -> int:
        """Samples this rank sees in a whole epoch."""
        if self.pad:
            return math.ceil(self.num_samples / self.world_size)

        return len(range(self.rank, self.num_samples, self.world_size))

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order; ``start`` skips this rank's first ``start`` samples (a mid-epoch resume)."""
        self.epoch = epoch
        self.start = start

    def epoch_order(self, epoch: int) -> list[int]:
        """This rank's whole order for ``epoch``."""
        generator = epoch_generator(self.seed, epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
        elif self.shuffle:
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)

        order_list = order.tolist()
        if self.pad:
            total = self.samples_per_rank * self.world_size
            order_list += (order_list * math.ceil(total / len(order_list)))[: total - len(order_list)]

        return order_list[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.epoch_order(self.epoch)[self.start :]:
            yield (self.epoch, index)

    def __len__(self) -> int:
        return self.samples_per_rank - self.start


def class_balanced_weights(targets: Sequence[int]) -> list[float]:
    """Per-sample weights that make every class equally likely to be drawn."""
    counts = Counter(targets)
    return [1.0 / counts[target] for target in targets]
