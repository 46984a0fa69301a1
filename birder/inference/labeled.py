"""Labelled photos through a model once: the raw logits, embeddings and true classes that ``birder-calibrate`` fits
on and ``birder-eval`` scores.

Photos come as an ImageFolder root (``<class>/<images>``), a CSV file of ``path,label`` rows or a ``reviews.csv`` of
``birder-review`` (the reviewed photos of its results folder: :mod:`birder.review.answers`), and their classes
must be the model's (a photo of another species belongs in ``--unknown-dir``, not in a calibration set). They go
through the batch predictor (:class:`~birder.inference.predictor.Predictor`): the decoder, transform and
``infer_batch`` of ``birder-predict``, so what is fitted here is what prediction computes. Unreadable photos are
left out and counted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from tqdm import tqdm

from birder.data.training import DataError, csv_files, image_folder_files
from birder.errors import BirderError, ImageDecodeError
from birder.inference.predictor import Predictor
from birder.inference.stand_ins import DEFAULT_PER_KIND, MADE_KINDS, TWO_PHOTO_KINDS, make_stand_in, pair_sources
from birder.io.images import load_image
from birder.net.base import BaseNet

# How many class names an error lists before it summarises
_SHOWN = 10


@dataclass(frozen=True)
class LabeledPhotos:
    paths: list[Path]
    targets: list[int]  # the model's class indices


def labeled_photos(data: str | os.PathLike, class_to_idx: Mapping[str, int]) -> LabeledPhotos:
    """The photos of ``data`` (an ImageFolder root or a ``.csv`` file) with the model's indices of their classes.

    A class the model does not have is a one-line :class:`~birder.data.training.DataError` naming it.
    """
    files = csv_files(data) if Path(data).suffix.lower() == ".csv" else image_folder_files(data)
    foreign = sorted(set(files.class_to_idx) - set(class_to_idx))
    if foreign:
        shown = ", ".join(foreign[:_SHOWN]) + (" ..." if len(foreign) > _SHOWN else "")
        raise DataError(
            f"{data}: {len(foreign)} class(es) the model does not have: {shown} (use photos of the model's classes; "
            "other species belong in an unknown set)"
        )

    name_of = {index: name for (name, index) in files.class_to_idx.items()}
    return LabeledPhotos(list(files.paths), [class_to_idx[name_of[target]] for target in files.targets])


@dataclass(frozen=True)
class ModelOutputs:
    """One row per readable photo."""

    logits: npt.NDArray[np.float32]  # [N, classes], raw
    embeddings: npt.NDArray[np.float32]  # [N, D]
    targets: npt.NDArray[np.int64]  # [N]; -1 for photos without a label
    paths: list[str]
    unreadable: list[str]  # the one-line reason of each photo left out

    def __len__(self) -> int:
        return len(self.paths)


def collect_outputs(
    net: BaseNet,
    transform: Callable[[Any], torch.Tensor],
    paths: Sequence[str | os.PathLike],
    targets: Sequence[int] | None = None,
    *,
    batch_size: int = 32,
    workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
    description: str = "photos",
) -> ModelOutputs:
    """Run ``net`` over ``paths`` (with their class indices ``targets``, if known) and keep its raw outputs."""
    predictor = Predictor(
        net,
        transform,
        batch_size=batch_size,
        num_workers=workers,
        amp=amp_dtype is not None,
        amp_dtype=amp_dtype,
        return_embedding=True,
        return_logits=True,
        read_metadata=False,
    )
    (logits, embeddings, rows, unreadable) = ([], [], [], [])
    with tqdm(total=len(paths), unit="img", desc=description, disable=not progress, leave=False) as bar:
        for batch in predictor.predict_files(paths):
            unreadable += [reason for (_, reason) in batch.failures]
            if batch.indices:
                logits.append(batch.logits)
                embeddings.append(batch.embeddings)
                rows += batch.indices
            bar.update(batch.num_photos)

    dim = getattr(net, "embedding_size", 0)
    classes = getattr(net, "num_classes", 0)
    all_targets = np.asarray(targets if targets is not None else [-1] * len(paths), dtype=np.int64)
    return ModelOutputs(
        logits=np.concatenate(logits) if logits else np.zeros((0, classes), np.float32),
        embeddings=np.concatenate(embeddings) if embeddings else np.zeros((0, dim), np.float32),
        targets=all_targets[rows] if rows else np.zeros(0, np.int64),
        paths=[os.fsdecode(paths[row]) for row in rows],
        unreadable=unreadable,
    )


class _MadeStandIns(torch.utils.data.Dataset):
    """The made stand-in unknowns (:mod:`birder.inference.stand_ins`): row ``i`` is of kind ``kinds[i]`` from the
    photos ``pairs[i]``, decoded and transformed as prediction does, made in pixel space, normalised again. Each
    row draws from its own generator (``seed``, ``i``): the same photos whatever the workers."""

    def __init__(
        self, paths: Sequence[str], pairs: np.ndarray, kinds: Sequence[str], transform: Any, seed: int
    ) -> None:
        (self.paths, self.pairs, self.kinds, self.transform, self.seed) = (paths, pairs, kinds, transform, seed)
        stats = getattr(transform, "rgb_stats", {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)})
        self.mean = torch.tensor(stats["mean"], dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(stats["std"], dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.kinds)

    def _pixels(self, row: int) -> torch.Tensor:
        path = self.paths[row]
        try:
            image = load_image(path)
        except ImageDecodeError as exc:  # it was read a moment ago, for the validation outputs
            raise BirderError(f"{path}: could not be read again to make stand-in unknowns ({exc})") from None
        return self.transform(image) * self.std + self.mean

    def __getitem__(self, index: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, index])
        (first, second) = self.pairs[index]
        kind = self.kinds[index]
        other = self._pixels(int(second)) if kind in TWO_PHOTO_KINDS else None  # decoded only where it is used
        made = make_stand_in(self._pixels(int(first)), other, kind, rng)
        return (made.clamp_(0.0, 1.0) - self.mean) / self.std


def collect_stand_in_outputs(
    net: BaseNet,
    transform: Callable[[Any], torch.Tensor],
    known: ModelOutputs,
    per_kind: int = DEFAULT_PER_KIND,
    *,
    seed: int = 0,
    batch_size: int = 32,
    workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, ModelOutputs]:
    """The network's outputs for ``per_kind`` stand-in unknowns of each of :data:`MADE_KINDS`, made from the
    labelled photos of ``known`` (pairs from different classes); their targets are -1, their paths say what each
    was made of (``"cutmix:a.jpg+b.jpg"``, ``"rotate:a.jpg"``)."""
    labelled = np.flatnonzero(np.asarray(known.targets) >= 0)
    if per_kind <= 0 or not len(labelled):
        return {}
    rng = np.random.default_rng(seed)
    pairs = labelled[pair_sources(np.asarray(known.targets)[labelled], per_kind * len(MADE_KINDS), rng)]
    kinds = [kind for kind in MADE_KINDS for _ in range(per_kind)]
    dataset = _MadeStandIns(known.paths, pairs, kinds, transform, seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    predictor = Predictor(
        net, transform, batch_size=batch_size, amp=amp_dtype is not None, amp_dtype=amp_dtype,
        return_embedding=True, return_logits=True, read_metadata=False,
    )  # fmt: skip
    (logits, embeddings) = ([], [])
    with tqdm(total=len(dataset), unit="img", desc="stand-in unknowns", disable=not progress, leave=False) as bar:
        for batch in loader:
            (_, batch_embeddings, batch_logits, _) = predictor.predict_tensor(batch)
            logits.append(batch_logits)
            embeddings.append(batch_embeddings)
            bar.update(len(batch))
    (all_logits, all_embeddings) = (np.concatenate(logits), np.concatenate(embeddings))
    found = {}
    for number, kind in enumerate(MADE_KINDS):
        rows = slice(number * per_kind, (number + 1) * per_kind)
        found[kind] = ModelOutputs(
            logits=all_logits[rows],
            embeddings=all_embeddings[rows],
            targets=np.full(per_kind, -1, dtype=np.int64),
            paths=[
                f"{kind}:{known.paths[a]}" + (f"+{known.paths[b]}" if kind in TWO_PHOTO_KINDS else "")
                for (a, b) in pairs[rows]
            ],
            unreadable=[],
        )
    return found
