"""Set-up steps both trainers share: sizes and colour statistics, seeding, loaders, drop path, resume files."""

import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from birder.data.training import EpochSampler, collate_training_samples
from birder.data.transforms import RGB_STATS, RGBStats
from birder.errors import BirderError
from birder.training.state import find_latest_state

RESUME_LATEST = "latest"


def resolve_size(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)

    (height, width) = (int(v) for v in size)
    return (height, width)


def resolve_rgb_stats(rgb_stats: str | Mapping[str, Sequence[float]]) -> RGBStats:
    """A preset name of :data:`RGB_STATS` (``birder``, ``imagenet``, ...) or explicit ``mean`` / ``std``."""
    if isinstance(rgb_stats, str):
        if rgb_stats not in RGB_STATS:
            raise BirderError(f"unknown rgb_stats preset '{rgb_stats}' (choose one of: {', '.join(RGB_STATS)})")
        return dict(RGB_STATS[rgb_stats])

    return {"mean": tuple(rgb_stats["mean"]), "std": tuple(rgb_stats["std"])}


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch with ``seed + rank`` (rank 0: the same seed on every rank)."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def make_loader(
    dataset: Dataset,
    sampler: EpochSampler,
    batch_size: int,
    workers: int,
    device: torch.device,
    collate_fn: Callable[[list[Any]], Any] = collate_training_samples,
) -> DataLoader:
    """A loader over the sampler's remaining keys. Its own generator keeps the global one untouched, so creating
    it does not shift the random stream a resumed run must continue."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),
    )


class IndexedEpochs:
    """Epochs of a map-style dataset in the order of an :class:`EpochSampler` (folders and CSV files)."""

    def __init__(
        self,
        dataset: Dataset,
        sampler: EpochSampler,
        batch_size: int,
        collate_fn: Callable[[list[Any]], Any] = collate_training_samples,
    ) -> None:
        (self.dataset, self.sampler, self.batch_size, self.collate_fn) = (dataset, sampler, batch_size, collate_fn)

    @property
    def samples_per_rank(self) -> int:
        return self.sampler.samples_per_rank

    def loader(self, epoch: int, skip_batches: int, workers: int, device: torch.device) -> DataLoader:
        self.sampler.set_epoch(epoch, start=skip_batches * self.batch_size)
        return make_loader(self.dataset, self.sampler, self.batch_size, workers, device, self.collate_fn)


def resolve_resume(resume: str | Path | None, output_dir: Path, stem: str) -> Path | None:
    """``latest``: the most advanced state file of this run in ``output_dir`` (None when there is none yet)."""
    if resume is None:
        return None
    if str(resume) == RESUME_LATEST:
        return find_latest_state(output_dir, stem)

    return Path(resume)
