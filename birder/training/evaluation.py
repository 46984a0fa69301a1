"""Classification metrics: loss, top-1, top-k, per-class precision / recall, expected calibration error (ECE).

Everything is accumulated as sums (a confusion matrix, per-bin confidence totals), so distributed ranks each
score their share of the validation set and one all-reduce gives the exact totals.
"""

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from birder.distributed import DistInfo, all_reduce_sum
from birder.errors import CheckpointError
from birder.inference.labeled import ModelOutputs, collect_outputs
from birder.inference.model import load_for_inference
from birder.io.atomic import atomic_write_path
from birder.net.base import BaseNet
from birder.plots import save_confusion_matrix_png
from birder.review.answers import labeled_or_reviewed_photos
from birder.training.amp import amp_dtype, autocast
from birder.training.ddp import distinct_over_ranks
from birder.training.fsdp import idle_forward, in_lockstep, is_sharded
from birder.training.metrics import format_value


@dataclass(frozen=True)
class ClassStats:
    name: str
    precision: float  # nan when the class was never predicted
    recall: float  # nan when the class has no samples
    support: int


@dataclass(frozen=True)
class EvalResult:
    loss: float
    top1: float
    top_k: float
    k: int
    ece: float
    samples: int
    per_class: list[ClassStats]
    confusion: torch.Tensor  # [true class, predicted class] counts


class ClassificationMeter:
    def __init__(self, num_classes: int, top_k: int = 5, ece_bins: int = 15, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.k = max(1, min(top_k, num_classes))
        self.ece_bins = ece_bins
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
        # loss sum, top-k hits; per confidence bin: confidence sum, correct count
        self.totals = torch.zeros(2, dtype=torch.float64, device=device)
        self.bins = torch.zeros(2, ece_bins, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits = logits.float()
        probs = logits.softmax(dim=1)
        (confidence, predicted) = probs.max(dim=1)
        correct = (predicted == targets).double()
        flat = targets * self.num_classes + predicted
        self.confusion += torch.bincount(flat, minlength=self.num_classes**2).reshape_as(self.confusion)
        self.totals[0] += F.cross_entropy(logits, targets, reduction="sum").double()
        self.totals[1] += (logits.topk(self.k, dim=1).indices == targets[:, None]).any(dim=1).double().sum()
        bin_index = (confidence * self.ece_bins).long().clamp(max=self.ece_bins - 1)
        for row, values in enumerate((confidence.double(), correct)):
            self.bins[row].index_add_(0, bin_index, values)

    def reduce(self, dist: DistInfo) -> None:
        """Sum the counts of every rank (a collective call)."""
        for tensor in (self.confusion, self.totals, self.bins):
            all_reduce_sum(tensor, dist)

    def result(self, class_names: Sequence[str]) -> EvalResult:
        confusion = self.confusion.cpu()
        samples = int(confusion.sum())
        hits = confusion.diagonal()
        predicted = confusion.sum(dim=0)
        support = confusion.sum(dim=1)
        per_class = [
            ClassStats(
                name,
                float(hits[i] / predicted[i]) if predicted[i] else math.nan,
                float(hits[i] / support[i]) if support[i] else math.nan,
                int(support[i]),
            )
            for i, name in enumerate(class_names)
        ]
        # ECE = sum over bins of (bin share) * |mean confidence - accuracy| = sum |confidence sum - hits| / N
        (confidence_sum, correct_sum) = self.bins.cpu()
        ece = float((confidence_sum - correct_sum).abs().sum() / samples) if samples else math.nan
        return EvalResult(
            loss=float(self.totals[0]) / samples if samples else math.nan,
            top1=float(hits.sum()) / samples if samples else math.nan,
            top_k=float(self.totals[1]) / samples if samples else math.nan,
            k=self.k,
            ece=ece,
            samples=samples,
            per_class=per_class,
            confusion=confusion.long(),
        )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    *,
    dist: DistInfo,
    class_names: Sequence[str],
    amp_dtype: torch.dtype | None = None,
    top_k: int = 5,
    progress_bar: bool = True,
) -> tuple[EvalResult, frozenset[str]]:
    """Score ``model`` on this rank's share of ``loader``, reduced over ranks (a collective call); returns the
    result and the unreadable images (dropped) of every rank, as the error messages that name them."""
    was_training = model.training
    model.eval()
    meter = ClassificationMeter(len(class_names), top_k=top_k, device=dist.device)
    unreadable: set[str] = set()
    bar = tqdm(loader, desc="evaluating", unit="batch", leave=False, disable=not (dist.is_main and progress_bar))
    # A sharded (FSDP) model needs every rank in every forward, also past the end of a shorter share.
    lockstep = is_sharded(model)
    for batch in in_lockstep(bar, dist) if lockstep else bar:
        if batch is not None:
            unreadable.update(batch.unreadable)
        if batch is None or batch.indices.numel() == 0:
            if lockstep:
                with autocast(dist.device, amp_dtype):
                    idle_forward(model, dist.device)
            continue

        with autocast(dist.device, amp_dtype):
            logits = model(batch.images.to(dist.device, non_blocking=True))
        meter.update(logits, batch.targets.to(dist.device))

    meter.reduce(dist)
    model.train(was_training)
    return (meter.result(class_names), distinct_over_ranks(unreadable, dist))


@dataclass(frozen=True)
class CheckpointScores:
    """A model scored on labelled photos, with what the score came from (for the reports of ``birder-eval``)."""

    result: EvalResult
    outputs: ModelOutputs  # raw logits, embeddings and classes of the readable photos
    net: BaseNet
    class_names: list[str]
    transform: Callable[[Any], torch.Tensor]

    @property
    def unreadable(self) -> int:
        return len(self.outputs.unreadable)


def score_checkpoint(
    checkpoint: str | Path | None,
    data: str | Path,
    *,
    name: str | None = None,
    network: str | None = None,
    batch_size: int = 64,
    workers: int = 4,
    device: str | None = None,
    amp: str | None = None,
    top_k: int = 5,
    progress_bar: bool = True,
) -> CheckpointScores:
    """Score a classifier on labeled images: an ImageFolder root (``data/<class>/<images>``) or a CSV file of
    ``path,label`` rows.

    The model is a file (``checkpoint``) or a pretrained ``name``, as every command takes one
    (:func:`birder.inference.model.load_for_inference`). Images go through the model's own inference transform and
    the batch predictor of ``birder-predict`` (:func:`birder.inference.labeled.collect_outputs`); the scores are
    of the raw logits. ``device`` is a name that :func:`birder.distributed.resolve_device` takes (None: auto).
    """
    loaded = load_for_inference(name, checkpoint, network, device=device, progress_bar=progress_bar)
    (net, info, target) = (loaded.net, loaded.info, loaded.device)
    if not info.class_to_idx:
        raise CheckpointError(f"{checkpoint or name}: a model without classes (an MIM encoder?); fine-tune it first")

    class_names = loaded.class_names
    photos = labeled_or_reviewed_photos(data, info.class_to_idx)
    transform = loaded.transform
    outputs = collect_outputs(
        net,
        transform,
        photos.paths,
        photos.targets,
        batch_size=batch_size,
        workers=workers,
        amp_dtype=amp_dtype(amp, target),
        progress=progress_bar,
        description="evaluating",
    )
    meter = ClassificationMeter(len(class_names), top_k=top_k)
    if len(outputs):
        meter.update(torch.from_numpy(outputs.logits), torch.from_numpy(outputs.targets))
    return CheckpointScores(meter.result(class_names), outputs, net, class_names, transform)


def evaluate_checkpoint(checkpoint: str | Path | None, data: str | Path, **options: Any) -> tuple[EvalResult, int]:
    """:func:`score_checkpoint` (same arguments); returns the result and the number of unreadable images (skipped)."""
    scores = score_checkpoint(checkpoint, data, **options)
    return (scores.result, scores.unreadable)


def write_eval_outputs(result: EvalResult, output_dir: str | Path, *, per_class_csv: bool = True) -> Path | None:
    """``confusion_matrix.csv`` and ``.png`` (and ``per_class.csv``) in ``output_dir``; returns the PNG path
    (None without matplotlib)."""
    output_dir = Path(output_dir)
    names = [stats.name for stats in result.per_class]
    write_csv(
        output_dir / "confusion_matrix.csv",
        ["true \\ predicted", *names],
        [[name, *row] for name, row in zip(names, result.confusion.tolist(), strict=True)],
    )
    if per_class_csv:
        rows = [[c.name, c.precision, c.recall, c.support] for c in result.per_class]
        write_csv(output_dir / "per_class.csv", ["class", "precision", "recall", "support"], rows)

    return save_confusion_matrix_png(result.confusion, names, output_dir / "confusion_matrix.png")


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A small CSV report, written atomically (floats with 6 significant digits)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[format_value(value) for value in row] for row in rows])
    with atomic_write_path(path) as tmp_path:
        tmp_path.write_text(buffer.getvalue(), encoding="utf-8")
