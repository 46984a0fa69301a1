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
from birder.inference.predictor import Predictor
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
