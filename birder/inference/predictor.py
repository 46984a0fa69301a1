"""The batch-prediction loop behind ``birder-predict`` (and the server's throughput benchmark).

:class:`Predictor` streams photos through a ``DataLoader`` whose worker processes decode and transform the next
batches while the network runs on the current one, and yields :class:`PredictionBatch` objects. Preprocessing
and inference are :func:`~birder.io.images.load_image`, the model's ``classification_transform`` and
:func:`~birder.inference.classification.infer_batch`: exactly what ``infer_image`` does, so a photo gets the
same probabilities from the library, the command line and the server.

Also here: ``torchrun`` sharding (devices and process groups: :mod:`birder.distributed`), restricting the answer to
a regional species list (:class:`ClassSelection`) and the end-of-run summary (:class:`RunSummary`).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import DataLoader

from birder.errors import BirderError, RunFailedError, check_at_least
from birder.inference.classification import infer_batch, logits_from_embeddings
from birder.inference.dataset import ImageFileDataset, PhotoBatch, PhotoMetadata, collate_photos, one_line_error
from birder.io.checkpoint import ModelInfo, names_by_index
from birder.net.base import BaseNet

logger = logging.getLogger(__name__)

T = TypeVar("T")


class PredictionError(RunFailedError):
    """A failure that is not about one photo (the model or the transform raised): the run cannot go on."""


# ---------------------------------------------------------------------------------------------------------------------
# Model and device
# ---------------------------------------------------------------------------------------------------------------------


def load_inference_model(
    model: str | None = None,
    weights: str | os.PathLike | None = None,
    network: str | None = None,
    *,
    progress_bar: bool = True,
) -> tuple[BaseNet, ModelInfo]:
    """The model the command line asks for, in eval mode without gradients, on the CPU
    (:func:`birder.inference.model.load_for_inference`, as every command loads one)."""
    from birder.inference.model import load_for_inference

    loaded = load_for_inference(model, weights, network, device=torch.device("cpu"), progress_bar=progress_bar)
    return (loaded.net, loaded.info)  # type: ignore[return-value]


def compile_for_inference(net: BaseNet) -> BaseNet:
    """Compile the parts ``infer_batch`` calls (``embedding`` and ``classify``) with ``torch.compile``.

    ``torch.compile(net)`` alone would only compile ``forward``, which the inference path does not call.
    """
    net.embedding = torch.compile(net.embedding)  # type: ignore[method-assign]
    net.classify = torch.compile(net.classify)  # type: ignore[method-assign]
    return net


# ---------------------------------------------------------------------------------------------------------------------
# The batch loop
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class PredictionBatch:
    """The outputs for one batch of photos; row ``i`` of every array is photo ``indices[i]``."""

    indices: list[int]
    probabilities: npt.NDArray[np.float32]  # [B, num_classes], softmax (averaged over the TTA views)
    embeddings: npt.NDArray[np.float32] | None  # [B, D]
    logits: npt.NDArray[np.float32] | None  # [B, num_classes]
    features: dict[str, npt.NDArray[np.float32]] | None  # name -> [B, D, h, w] detection feature maps
    metadata: list[PhotoMetadata]
    failures: list[tuple[int, str]]  # (index, one-line reason) of the photos of this batch that failed
    # Stage timings: the loader's seconds decoding the batch (in its workers) and the network's on it
    decode_seconds: float = 0.0
    model_seconds: float = 0.0

    @property
    def num_photos(self) -> int:
        return len(self.indices) + len(self.failures)


def _advice(exc: Exception) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "use a smaller batch size"
    return "check that the model, its weights and the input size fit together"


def model_failure(first_path: str | os.PathLike, exc: Exception, what: str = "the model") -> PredictionError:
    """The one-line error that stops a run when a network raised on the batch starting with ``first_path``."""
    first = os.fsdecode(first_path)
    return PredictionError(f"{what} failed on the batch starting with '{first}': {one_line_error(exc)}; {_advice(exc)}")


class Predictor:
    """Runs a classification network over photo files in batches.

    Args:
        net: the network, already on its device and in its dtype (see ``optimize_for_inference``).
        transform: the model's inference transform (``classification_transform``).
        batch_size: photos per forward pass.
        num_workers: ``DataLoader`` worker processes that decode the next batches meanwhile (0: decode in this
            process, which is simplest to debug but leaves the network idle while it decodes).
        tta: average five crops per photo (5x the compute).
        amp: run under ``torch.autocast`` in ``amp_dtype`` (default float16 on GPUs, bfloat16 on the CPU).
        return_embedding / return_logits / return_features: also produce those outputs.
        read_metadata: read the EXIF date and GPS position of each photo.
        calibrated: apply the model's temperature to the probabilities (``infer_batch``'s ``calibrated``).
    """

    def __init__(
        self,
        net: BaseNet,
        transform: Any,
        *,
        batch_size: int = 32,
        num_workers: int = 0,
        tta: bool = False,
        amp: bool = False,
        amp_dtype: torch.dtype | None = None,
        return_embedding: bool = False,
        return_logits: bool = False,
        return_features: bool = False,
        read_metadata: bool = True,
        calibrated: bool = True,
    ) -> None:
        check_at_least(batch_size, 1, "the batch size")
        check_at_least(num_workers, 0, "the number of workers")

        self.net = net
        self.transform = transform
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.tta = tta
        self.device = next(net.parameters()).device
        self.amp = amp
        self.amp_dtype = amp_dtype or (torch.bfloat16 if self.device.type == "cpu" else torch.float16)
        self.return_embedding = return_embedding
        self.return_logits = return_logits
        self.return_features = return_features
        self.read_metadata = read_metadata
        self.calibrated = calibrated

    def _autocast(self) -> Any:
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.amp)

    def predict_tensor(
        self, inputs: torch.Tensor
    ) -> tuple[
        npt.NDArray[np.float32],
        npt.NDArray[np.float32] | None,
        npt.NDArray[np.float32] | None,
        dict[str, npt.NDArray[np.float32]] | None,
    ]:
        """``(probabilities, embeddings, logits, features)`` of transformed images ``[B, C, H, W]``."""
        with self._autocast():
            (probabilities, embeddings) = infer_batch(
                self.net, inputs, return_embedding=True, tta=self.tta, calibrated=self.calibrated
            )
            # Without TTA simply the network's logits; with it the mean of the views' (the head is linear)
            logits = logits_from_embeddings(self.net, embeddings) if self.return_logits else None

            features = None
            if self.return_features:
                # A separate pass: detection features are the patch tokens, which infer_batch does not return
                with torch.inference_mode():
                    param = next(self.net.parameters())
                    maps = self.net.detection_features(inputs.to(device=param.device, dtype=param.dtype))
                    features = {name: value.float().cpu().numpy() for (name, value) in maps.items()}

        return (probabilities, embeddings if self.return_embedding else None, logits, features)

    def loader(
        self,
        paths: Sequence[str | os.PathLike],
        indices: Sequence[int] | None = None,
        *,
        transform: Any = None,
        stack: bool = True,
        batch_size: int | None = None,
    ) -> DataLoader:
        """Decoded photos in batches (:class:`PhotoBatch`) of ``batch_size`` (default: the predictor's), through
        ``transform`` (default: the network's); ``stack=False`` keeps each batch's items as a list (see
        :func:`collate_photos`)."""
        transform = transform if transform is not None else self.transform
        dataset = ImageFileDataset(paths, transform, indices=indices, read_metadata=self.read_metadata)
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=False,  # the journals rely on photo order
            num_workers=self.num_workers,
            collate_fn=collate_photos if stack else functools.partial(collate_photos, stack=False),
            pin_memory=self.device.type == "cuda",
            # Two batches in flight per worker keep the network fed without holding many decoded images
            prefetch_factor=2 if self.num_workers > 0 else None,
        )

    def predict_files(
        self, paths: Sequence[str | os.PathLike], indices: Sequence[int] | None = None
    ) -> Iterator[PredictionBatch]:
        """Predict ``paths`` (or only ``paths[i]`` for ``i`` in ``indices``), in order, one batch at a time.

        A photo that cannot be decoded is reported in its batch's ``failures``; it never stops the loop.

        Raises:
            PredictionError: the transform or the model raised. That is no photo's fault and would happen to every
                photo, so it stops the run (one line; a model's exception is its ``__cause__``, a transform's can
                only be described, as it may come from a worker process).
        """
        batch: PhotoBatch
        for batch in self.loader(paths, indices):
            if batch.run_error is not None:
                raise PredictionError(f"{batch.run_error}; check the preprocessing options (size, crop)")
            if batch.inputs is None:
                empty = np.zeros((0, 0), np.float32)
                yield PredictionBatch([], empty, None, None, None, [], batch.failures, batch.seconds)
                continue

            started = time.perf_counter()
            try:
                (probabilities, embeddings, logits, features) = self.predict_tensor(batch.inputs)
            except Exception as exc:
                raise model_failure(paths[batch.indices[0]], exc) from exc
            yield PredictionBatch(
                batch.indices,
                probabilities,
                embeddings,
                logits,
                features,
                batch.metadata,
                batch.failures,
                batch.seconds,
                time.perf_counter() - started,
            )


# ---------------------------------------------------------------------------------------------------------------------
# Species lists, top-k
# ---------------------------------------------------------------------------------------------------------------------


def read_species_file(path: str | os.PathLike) -> list[str]:
    """Class names from a text file, one per line; blank lines and ``#`` comments are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise BirderError(f"species file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BirderError(f"cannot read species file '{path}': {' '.join(str(exc).split())}") from None

    names = []
    for line in text.splitlines():
        name = line.split("#", 1)[0].strip()
        if name and name not in names:
            names.append(name)

    if not names:
        raise BirderError(f"species file '{path}' lists no class names (one per line expected)")

    return names


class ClassSelection:
    """The classes an answer may use: all of the model's, or those of a regional species list.

    With a list, probabilities are renormalized over the listed classes (the model's belief given that the bird
    is one of them). ``unknown`` holds the listed names the model does not know.
    """

    def __init__(self, class_to_idx: Mapping[str, int], species: Sequence[str] | None = None) -> None:
        all_names = names_by_index(class_to_idx)
        self.all_names = all_names
        self.unknown: list[str] = []
        if species is None:
            self.names = all_names
            self.indices: npt.NDArray[np.int64] | None = None
            return

        known = [name for name in species if name in class_to_idx]
        self.unknown = [name for name in species if name not in class_to_idx]
        if not known:
            raise BirderError(
                f"none of the {len(species)} species listed is a class of this model "
                f"(e.g. '{species[0]}'); class names look like '{all_names[0]}'"
            )

        self.names = known
        self.indices = np.array([class_to_idx[name] for name in known], dtype=np.int64)

    def apply(self, probabilities: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """``[B, num_classes]`` -> ``[B, len(names)]`` probabilities over the selected classes, summing to 1."""
        if self.indices is None:
            return probabilities

        selected = probabilities[:, self.indices].astype(np.float64)
        total = selected.sum(axis=1, keepdims=True)
        # All mass outside the list (underflow to 0): no basis to prefer one listed class, so spread it evenly
        uniform = np.full_like(selected, 1.0 / selected.shape[1])
        normalized = np.divide(selected, total, out=uniform, where=total > 0)
        return normalized.astype(np.float32)


def top_k(probabilities: npt.NDArray[np.float32], k: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """The ``k`` most probable classes of each row, most probable first (ties: the lower class index first)."""
    k = min(k, probabilities.shape[1])
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return (order, np.take_along_axis(probabilities, order, axis=1))


# ---------------------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------------------


class RunSummary:
    """Counts per predicted species and, for photos in folders named after a class, top-1 / top-k accuracy."""

    def __init__(self, class_names: Iterable[str], top_k: int) -> None:
        self.class_names = frozenset(class_names)
        self.top_k = top_k
        self.predictions: Counter[str] = Counter()
        self.labelled = 0
        self.correct_top1 = 0
        self.correct_top_k = 0
        self.failures = 0
        self.noun = "photos"  # what is classified: photos, or the boxes of a crop-then-classify run

    def add(self, path: str, prediction: str, top_classes: Sequence[str]) -> None:
        self.predictions[prediction] += 1
        label = Path(path).parent.name
        if label in self.class_names:
            self.labelled += 1
            self.correct_top1 += bool(top_classes) and top_classes[0] == label
            self.correct_top_k += label in top_classes[: self.top_k]

    @property
    def classified(self) -> int:
        return sum(self.predictions.values())

    def format(self, max_species: int = 25, header: str | None = None) -> str:
        """The summary's lines; ``header`` replaces the first (what was classified: photos, or detected boxes)."""
        lines = [header or f"Classified {self.classified} photos, {self.failures} could not be read."]
        if self.predictions:
            lines.append("Predicted species:")
            width = max(len(name) for (name, _) in self.predictions.most_common(max_species))
            for name, count in self.predictions.most_common(max_species):
                lines.append(f"  {name:<{width}}  {count:>7}  {100.0 * count / self.classified:5.1f}%")
            if len(self.predictions) > max_species:
                lines.append(f"  ... and {len(self.predictions) - max_species} more species")
        if self.labelled:
            lines.append(
                f"Accuracy on the {self.labelled} {self.noun} in folders named after a class: "
                f"top-1 {100.0 * self.correct_top1 / self.labelled:.1f}%, "
                f"top-{self.top_k} {100.0 * self.correct_top_k / self.labelled:.1f}%"
            )

        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "classified": self.classified,
            "failures": self.failures,
            "predictions": dict(self.predictions.most_common()),
        }
        if self.labelled:
            result["labelled"] = self.labelled
            result["top1_accuracy"] = self.correct_top1 / self.labelled
            result[f"top{self.top_k}_accuracy"] = self.correct_top_k / self.labelled

        return result


# ---------------------------------------------------------------------------------------------------------------------
# torchrun
# ---------------------------------------------------------------------------------------------------------------------

# Ranks meet at the end of a run; on millions of photos one may finish well before the slowest.
COLLECTIVE_TIMEOUT = timedelta(hours=6)


def shard_indices(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s share of ``indices``: every ``world_size``-th one. Shards are disjoint and cover all of them.

    Unlike ``DistributedSampler`` nothing is padded, so no photo is predicted (and written) twice.
    """
    return list(indices[rank::world_size])
