"""Training from WebDataset tar shards: the packed set's index, and a resumable stream over it.

A packed set (``python -m birder.tools pack``, :mod:`birder.data.packing`) is a folder of ``shard-NNNNNN.tar``
files and ``index.json`` (sample counts per shard, class names). Each sample in a shard is ``<key>.<ext>`` (the
image file's bytes as they were on disk), ``<key>.json`` (its relative path and label name) and, in a labelled
set, ``<key>.cls`` (the class index as text). Keys are the samples' numbers in packing order, so a sample has one
id however the shards are listed.

:class:`ShardStream` is the training data: it reads the tars with the ``webdataset`` package and yields whole
batches. An epoch is planned so that every property of the folder path (:class:`~birder.data.training.
EpochSampler`) holds for streams too:

- **Every sample once per epoch.** The epoch's shard order is a shuffle of ``(seed, epoch)``, the same on every
  rank; the concatenated stream is cut into one contiguous block per rank (padded by wrapping around, as
  :class:`EpochSampler` pads, when the count does not divide: every rank takes the same number of optimizer
  steps). A rank opens only the shards of its block, so the file system serves each byte to one rank.
- **Shuffled with a buffer.** Within a rank, samples pass through ``webdataset``'s shuffle buffer, seeded by
  ``(seed, epoch, rank)``.
- **Workers without duplicates, and an order that does not depend on them.** Batch ``j`` of the rank's stream is
  decoded by data-loader worker ``j mod workers``: every worker reads the rank's tar bytes and shuffles them the
  same way (cheap), but decodes only its own batches (the expensive part). ``DataLoader`` takes batches from its
  workers in turn, so the batches arrive in stream order, whatever the number of workers.
- **A fixed number of samples per epoch, and exact resume.** The count comes from the index, so schedules are
  planned as for folders; a resumed epoch replays the stream and skips (without decoding) the batches already
  trained on. Augmentation is seeded by ``(seed, epoch, sample id)``, as for folders.
"""

import bisect
import itertools
import json
import logging
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from birder.data.training import (
    UNLABELED,
    DataError,
    TrainingBatch,
    TrainingSample,
    collate_training_samples,
    epoch_generator,
    sample_seed,
)
from birder.errors import ImageDecodeError, one_line
from birder.io.images import IMAGE_EXTENSIONS, load_image_bytes

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
INDEX_FORMAT = "birder-wds-index"
INDEX_VERSION = 1
SHARD_PATTERN = "shard-{:06d}.tar"
DEFAULT_SHUFFLE_BUFFER = 1000
_IMAGE_SUFFIXES = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class Shard:
    path: Path
    samples: int
    first: int  # id of the shard's first sample (ids run on through the packed set, in packing order)


@dataclass(frozen=True)
class ShardSet:
    """Shards to read, with their sample counts and (for a labelled set) the class names."""

    shards: tuple[Shard, ...]
    class_names: tuple[str, ...] | None

    @property
    def total(self) -> int:
        return sum(shard.samples for shard in self.shards)

    @property
    def class_to_idx(self) -> dict[str, int]:
        if self.class_names is None:
            return {}
        return {name: idx for idx, name in enumerate(self.class_names)}


@dataclass(frozen=True)
class ShardRecord:
    """One sample as read from a tar, not yet decoded."""

    id: int
    image: bytes
    name: str  # how messages name it: "<shard>/<key> (<relative path>)"
    target: int


# Finding shards


def read_index(folder: Path) -> dict[str, Any] | None:
    """The ``index.json`` of a packed folder, or None when there is none."""
    path = folder / INDEX_FILE
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable shard index ({one_line(err)})") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise DataError(f"{path}: not a birder shard index (made by python -m birder.tools pack)")

    return index


def open_shards(spec: str | Path) -> ShardSet:
    """The shards ``spec`` names: a packed folder (its ``index.json`` lists them), or a brace pattern such as
    ``'shards/shard-{000000..000123}.tar'`` (several joined with ``::``).

    Counts and class names come from the folder's ``index.json``; a shard it does not list (made by another tool)
    is counted by reading it once.
    """
    spec_path = Path(spec)
    if spec_path.is_dir():
        index = read_index(spec_path)
        if index is None:
            paths = sorted(spec_path.glob("*.tar"))
            if not paths:
                raise DataError(f"{spec_path}: no .tar shards and no {INDEX_FILE} in this folder")
        else:
            paths = [spec_path / entry["name"] for entry in index["shards"]]
    else:
        paths = [Path(url) for url in wds.shardlists.expand_urls(str(spec))]
        if not paths:
            raise DataError(f"{spec}: the pattern names no shards")
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: no such shard ({len(missing)} of {len(paths)} named shards are missing)")

    return _shard_set(paths)


def _shard_set(paths: Sequence[Path]) -> ShardSet:
    indexes: dict[Path, dict[str, Any] | None] = {}
    (shards, class_names, next_first) = ([], None, 0)
    for path in paths:
        folder = path.parent
        if folder not in indexes:
            indexes[folder] = read_index(folder)
        index = indexes[folder]
        entry = _index_entry(index, path.name)
        if entry is None:
            logger.warning(
                "%s: not in an %s, counting its samples (pack with python -m birder.tools pack)", path, INDEX_FILE
            )
            entry = {"samples": count_samples(path), "first": next_first}
        elif index is not None and index.get("classes") is not None:
            names = tuple(index["classes"])
            if class_names is not None and names != class_names:
                raise DataError(f"{path}: its index has other classes than the shards before it")
            class_names = names
        shards.append(Shard(path, int(entry["samples"]), int(entry["first"])))
        next_first = max(next_first, shards[-1].first + shards[-1].samples)

    by_id = sorted(shards, key=lambda shard: shard.first)
    for shard, following in itertools.pairwise(by_id):
        if following.first < shard.first + shard.samples:
            raise DataError(f"{shard.path} and {following.path} hold the same samples: is a shard listed twice?")

    if sum(shard.samples for shard in shards) == 0:
        raise DataError(f"{paths[0].parent}: the shards hold no samples")
    return ShardSet(tuple(shards), class_names)


def _index_entry(index: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    if index is None:
        return None
    return next((entry for entry in index["shards"] if entry["name"] == name), None)


def count_samples(path: Path) -> int:
    return sum(1 for _ in _tar_samples(path))


# Reading


def _tar_samples(path: Path) -> Iterator[dict[str, Any]]:
    """The samples of one tar (members grouped by key), as ``webdataset`` reads them."""
    try:
        yield from wds.tarfile_samples([{"url": str(path)}])
    except Exception as err:  # tarfile, gopen and webdataset raise many types for one damaged file
        raise DataError(f"{path}: damaged or unreadable tar shard ({one_line(err)})") from None


def read_shard_records(shard: Shard, start: int = 0, stop: int | None = None) -> Iterator[ShardRecord]:
    """Samples ``start`` to ``stop`` (positions within the shard) of ``shard``."""
    stop = shard.samples if stop is None else stop
    for position, sample in enumerate(_tar_samples(shard.path)):
        if position >= stop:
            return
        if position >= start:
            yield _record(shard, position, sample)


def _record(shard: Shard, position: int, sample: dict[str, Any]) -> ShardRecord:
    key = sample["__key__"]
    meta: dict[str, Any] = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = {}
    name = f"{shard.path.name}/{key}" + (f" ({meta['path']})" if meta.get("path") else "")
    images = [suffix for suffix in sample if suffix in _IMAGE_SUFFIXES]
    image = sample[images[0]] if images else b""
    target = int(sample["cls"]) if "cls" in sample else UNLABELED
    return ShardRecord(shard.first + position, image, name, target)


# Planning an epoch


def rank_segments(
    counts: Sequence[int], *, seed: int, epoch: int | None, rank: int, world_size: int, pad: bool = True
) -> list[tuple[int, int, int]]:
    """This rank's part of an epoch as ``(shard number, start, stop)`` pieces, in reading order.

    ``epoch`` None keeps the shards in their listed order (evaluation). With ``pad`` every rank gets
    ``ceil(total / world_size)`` samples (the last rank's block wraps around to the stream's start), without it
    the blocks differ by at most one sample and nothing is read twice.
    """
    order = list(range(len(counts)))
    if epoch is not None:
        order = torch.randperm(len(counts), generator=epoch_generator(seed, epoch)).tolist()
    total = sum(counts)
    if pad:
        per_rank = math.ceil(total / world_size)
        (begin, end) = (rank * per_rank, (rank + 1) * per_rank)
    else:
        (begin, end) = (rank * total // world_size, (rank + 1) * total // world_size)

    starts = [0]
    for shard in order:
        starts.append(starts[-1] + counts[shard])
    segments = []
    position = begin
    while position < end:
        wrapped = position % total
        slot = bisect.bisect_right(starts, wrapped) - 1  # an empty shard shares its start with the next one
        take = min(starts[slot + 1] - wrapped, end - position)
        segments.append((order[slot], wrapped - starts[slot], wrapped - starts[slot] + take))
        position += take
    return segments


def samples_of_rank(total: int, rank: int, world_size: int, pad: bool = True) -> int:
    if pad:
        return math.ceil(total / world_size)
    return (rank + 1) * total // world_size - rank * total // world_size


# The stream


class ShardStream(IterableDataset):
    """Batches of :class:`~birder.data.training.TrainingBatch` read from shards (see the module's notes).

    Call :meth:`set_epoch` before making each epoch's loader (:meth:`loader`). Training (``shuffle``): epochs
    have their own shard order and shuffle, blocks are padded, and an unreadable image is replaced by a readable
    one of its batch (the batch keeps its size: ranks stay in step). Evaluation: listed order, no padding,
    unreadable images dropped.
    """

    def __init__(
        self,
        shard_set: ShardSet,
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        class_to_idx: Mapping[str, int] | None = None,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        # Shards packed on their own (a validation split) number their classes their own way: map them onto
        # the model's classes by name.
        self.target_map: dict[int, int] | None = None
        if class_to_idx is not None and shard_set.class_names is not None:
            unknown = sorted(set(shard_set.class_names) - set(class_to_idx))
            if unknown:
                raise DataError(f"the shards have classes the model does not: {', '.join(unknown[:10])}")
            self.target_map = {idx: class_to_idx[name] for idx, name in enumerate(shard_set.class_names)}
        self.shard_set = shard_set
        self.transform = transform
        self.batch_size = batch_size
        (self.rank, self.world_size, self.seed) = (rank, world_size, seed)
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.epoch: int | None = None
        self.skip_batches = 0

    @property
    def samples_per_rank(self) -> int:
        """Samples this rank sees in a whole epoch."""
        return samples_of_rank(self.shard_set.total, self.rank, self.world_size, pad=self.shuffle)

    @property
    def batches_per_rank(self) -> int:
        return math.ceil(self.samples_per_rank / self.batch_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch; ``skip_batches`` skips this rank's first batches (a mid-epoch resume)."""
        self.epoch = epoch
        self.skip_batches = skip_batches

    def loader(self, epoch: int, skip_batches: int, workers: int, device: torch.device) -> DataLoader:
        """The epoch's batches (those left after ``skip_batches``), decoded by ``workers`` processes."""
        self.set_epoch(epoch, skip_batches)
        # Its own generator: making a loader draws a seed, which must not shift the global random stream (a resumed
        # run restores that stream mid-epoch, after the uninterrupted run made its loader).
        return DataLoader(
            self, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda", generator=torch.Generator()
        )

    def records(self) -> Iterator[ShardRecord]:
        """This rank's samples for the current epoch, in training order (not decoded)."""
        counts = [shard.samples for shard in self.shard_set.shards]
        epoch = self.epoch if self.shuffle else None
        segments = rank_segments(
            counts, seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size, pad=self.shuffle
        )
        stream = (
            record
            for (number, start, stop) in segments
            for record in read_shard_records(self.shard_set.shards[number], start, stop)
        )
        if not self.shuffle or self.shuffle_buffer <= 1:
            return stream

        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}")  # str seeds hash the same in every process
        return iter(wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(stream))

    def __iter__(self) -> Iterator[TrainingBatch]:
        worker = get_worker_info()
        (worker_id, workers) = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        batch: list[ShardRecord] = []
        number = 0
        for record in self.records():
            batch.append(record)
            if len(batch) == self.batch_size:
                if self._owns(number, worker_id, workers):
                    yield self.decode(batch)
                (batch, number) = ([], number + 1)
        if batch and self._owns(number, worker_id, workers):
            yield self.decode(batch)

    def _owns(self, number: int, worker_id: int, workers: int) -> bool:
        # The loader asks its workers in turn starting with worker 0, so worker w decodes batches skip + w,
        # skip + w + workers, ...: in a resumed epoch too, batches arrive in the stream's order.
        return number >= self.skip_batches and (number - self.skip_batches) % workers == worker_id

    def decode(self, records: Sequence[ShardRecord]) -> TrainingBatch:
        """Decode and transform a batch; an unreadable image is replaced by the batch's next readable one
        (training) or dropped (evaluation). Its message travels with the batch."""
        (images, unreadable) = ({}, {})
        for record in records:
            try:
                images[record.id] = load_image_bytes(record.image, record.name)
            except ImageDecodeError as err:
                unreadable[record.id] = (str(err),)

        readable = [record for record in records if record.id in images]
        if not readable and self.shuffle:
            first = next(iter(unreadable.values()))[0]
            raise DataError(f"none of the {len(records)} images of a batch could be read (first: {first})")

        samples = []
        for position, record in enumerate(records):
            (source, image) = (record, None)
            if record.id not in images and self.shuffle:
                source = readable[position % len(readable)]
            if source.id in images:
                image = self._transform(images[source.id], source.id)
            samples.append(TrainingSample(record.id, image, self._target(source.target), unreadable.get(record.id, ())))
        return collate_training_samples(samples)

    def _target(self, target: int) -> int:
        if self.target_map is None or target == UNLABELED:
            return target
        return self.target_map[target]

    def _transform(self, image: Image.Image, sample_id: int) -> torch.Tensor:
        if not self.shuffle:
            return self.transform(image)

        with sample_seed(self.seed, self.epoch, sample_id):
            return self.transform(image)


def first_images(shard_set: ShardSet, count: int) -> list[Image.Image]:
    """The first ``count`` readable images of the set, in listed order (e.g. a fixed grid to visualize)."""
    images = []
    for shard in shard_set.shards:
        for record in read_shard_records(shard):
            if len(images) == count:
                return images
            try:
                images.append(load_image_bytes(record.image, record.name))
            except ImageDecodeError:
                continue
    return images
