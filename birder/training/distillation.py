"""Knowledge distillation: a trained (larger) teacher's outputs guide the student, besides the labels.

- ``soft``: the KL divergence between the teacher's and the student's temperature-scaled softmax (scaled by T²
  so its gradients keep their size whatever T), mixed with the label loss: ``alpha * KD + (1 - alpha) * label``.
- ``hard``: the teacher's top-1 class as a second label: ``alpha * CE(student, argmax teacher) + (1 - alpha) *
  label``, as DeiT's hard distillation (alpha 0.5).

The teacher runs in inference mode (eval, no gradients) in the dtype ``--dtype auto`` picks for the device:
bfloat16 where it is native. It sees exactly the images the student sees (augmented, mixed), converted to its own
input size and colour statistics when they differ from the student's. Its logits can be cached on disk, once for
the whole run, but only when the training inputs are the same every epoch (no random augmentation, no mixup):
otherwise cached logits would describe other images than those the student is shown.
"""

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from birder.data.training import EpochSampler, ImageDataset
from birder.distributed import DistInfo, main_first
from birder.errors import BirderError
from birder.inference.model import convert_dtype, load_for_inference
from birder.io.atomic import atomic_write_path
from birder.io.outputs import check_not_input
from birder.net.base import BaseNet
from birder.training.setup import make_loader

logger = logging.getLogger(__name__)

DISTILL_KINDS = ("soft", "hard")


@dataclass(frozen=True)
class DistillSettings:
    teacher: str | Path
    kind: str = "soft"
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the teacher's term; 1 - alpha goes to the labels
    cache: str | Path | None = None  # a file of the teacher's logits (deterministic inputs only)

    def check(self, *, random_inputs: bool) -> None:
        if self.kind not in DISTILL_KINDS:
            raise BirderError(f"unknown distillation '{self.kind}'; choose one of: {', '.join(DISTILL_KINDS)}")
        if not self.temperature > 0:
            raise BirderError(f"--distill-temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise BirderError(f"--distill-alpha must be between 0 and 1, got {self.alpha}")
        if self.cache is not None and random_inputs:
            raise BirderError(
                "--teacher-cache needs the same inputs every epoch: use --aug-level 0 and no --mixup/--cutmix "
                "(cached logits would not match randomly augmented images)"
            )


def soft_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on softmax(logits / T), times T² (Hinton et al.), averaged over the batch."""
    log_student = F.log_softmax(student.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


def distillation_term(student: torch.Tensor, teacher: torch.Tensor, settings: DistillSettings) -> torch.Tensor:
    if settings.kind == "hard":
        return F.cross_entropy(student, teacher.argmax(dim=1))
    return soft_distillation_loss(student, teacher, settings.temperature)


class InputAdapter:
    """Student inputs (normalised with the student's statistics) -> the teacher's normalisation."""

    def __init__(self, student_stats: Mapping[str, Sequence[float]], teacher_stats: Mapping[str, Sequence[float]]):
        self.identity = _same_stats(student_stats, teacher_stats)
        (self.scale, self.shift) = _renormalisation(student_stats, teacher_stats)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return images
        return images * self.scale.to(images.device) + self.shift.to(images.device)


def _same_stats(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]]) -> bool:
    return all(torch.allclose(torch.tensor(a[key]), torch.tensor(b[key])) for key in ("mean", "std"))


def _renormalisation(
    student: Mapping[str, Sequence[float]], teacher: Mapping[str, Sequence[float]]
) -> tuple[torch.Tensor, torch.Tensor]:
    # x_t = (pixel - mean_t) / std_t with pixel = x_s * std_s + mean_s
    (mean_s, std_s) = (torch.tensor(student["mean"]).view(3, 1, 1), torch.tensor(student["std"]).view(3, 1, 1))
    (mean_t, std_t) = (torch.tensor(teacher["mean"]).view(3, 1, 1), torch.tensor(teacher["std"]).view(3, 1, 1))
    return (std_s / std_t, (mean_s - mean_t) / std_t)


class Teacher:
    """The teacher network in inference mode, or its cached logits, and the loss it adds."""

    def __init__(self, net: BaseNet, adapter: InputAdapter, settings: DistillSettings) -> None:
        self.net = net
        self.adapter = adapter
        self.settings = settings
        self.cached: torch.Tensor | None = None  # [num training samples, classes], float32

    def logits(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if self.cached is not None:
            return self.cached[indices.cpu()].to(images.device)
        param = next(self.net.parameters())
        # no_grad rather than inference_mode: the logits enter the student's loss, which autograd records.
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            return self.net(self.adapter(images.detach()).to(param.dtype)).float()

    def loss(
        self, label_loss: torch.Tensor, student_logits: torch.Tensor, images: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        """The student's loss with the teacher's term mixed in."""
        term = distillation_term(student_logits, self.logits(images, indices), self.settings)
        return self.settings.alpha * term + (1.0 - self.settings.alpha) * label_loss


def load_teacher(
    settings: DistillSettings,
    *,
    class_to_idx: Mapping[str, int],
    size: tuple[int, int],
    rgb_stats: Mapping[str, Sequence[float]],
    device: torch.device,
) -> Teacher:
    """The teacher for a student of these classes, input size and colour statistics, ready on ``device``."""
    loaded = load_for_inference(weights=settings.teacher, device=torch.device("cpu"))  # moved once resized
    (net, info) = (loaded.net, loaded.info)
    if dict(info.class_to_idx) != dict(class_to_idx):
        raise BirderError(
            f"{settings.teacher}: the teacher's classes differ from the training data's "
            f"({len(info.class_to_idx)} vs {len(class_to_idx)} classes, or other names or order)"
        )
    if tuple(net.size) != tuple(size):
        net.adjust_size(size)  # the teacher sees the student's images as they are
    (net, choice) = convert_dtype(net.to(device), "auto", device)
    logger.info("teacher %s (%s) in %s, %s distillation", settings.teacher, net.network_name, choice, settings.kind)
    return Teacher(net, InputAdapter(rgb_stats, info.rgb_stats), settings)


# The cache


def attach_cache(teacher: Teacher, train_set: ImageDataset, batch_size: int, workers: int, dist: DistInfo) -> None:
    """Fill ``teacher.cached`` from ``settings.cache``, computing and writing the file (rank 0) when it is missing or
    was made for another teacher or data set. Only valid when ``train_set``'s transform is deterministic."""
    path = Path(teacher.settings.cache)
    # The cache is rewritten when stale: never onto the teacher or a training photo (birder.io.outputs)
    check_not_input(path, [teacher.settings.teacher, *train_set.paths], "--teacher-cache")
    key = _cache_key(teacher, train_set)
    teacher.cached = main_first(dist, lambda: _load_or_compute(path, key, teacher, train_set, batch_size, workers))


def _cache_key(teacher: Teacher, train_set: ImageDataset) -> str:
    source = Path(teacher.settings.teacher)
    stat = source.stat()
    facts = {
        "teacher": str(source.resolve()),
        "teacher_size": stat.st_size,
        "teacher_mtime_ns": stat.st_mtime_ns,
        "size": list(teacher.net.size),
        "paths": [str(path) for path in train_set.paths],
        "transform": repr(train_set.transform),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def _load_or_compute(
    path: Path, key: str, teacher: Teacher, train_set: ImageDataset, batch_size: int, workers: int
) -> torch.Tensor:
    if path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # torch.load raises many types for files it cannot read
            stored = None
        if not isinstance(stored, dict) or "key" not in stored or "logits" not in stored:
            raise BirderError(f"--teacher-cache '{path}' exists and holds no teacher logits: choose another file")
        if stored["key"] == key:
            logger.info("teacher logits from %s", path)
            return stored["logits"]
        logger.info("%s was made for another teacher or data set: computing it again", path)

    logits = _teacher_logits(teacher, train_set, batch_size, workers)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write_path(path) as tmp:
        torch.save({"key": key, "logits": logits}, tmp)
    logger.info("teacher logits of %d images cached in %s", len(train_set), path)
    return logits


def _teacher_logits(teacher: Teacher, train_set: ImageDataset, batch_size: int, workers: int) -> torch.Tensor:
    """The teacher's logits of every training sample, in index order (one pass, unsharded)."""
    device = next(teacher.net.parameters()).device
    sampler = EpochSampler(len(train_set), shuffle=False, pad=False)
    loader = make_loader(train_set, sampler, batch_size, workers, device)
    out = torch.empty(len(train_set), teacher.net.num_classes)
    for batch in loader:
        images = batch.images.to(device)
        out[batch.indices] = teacher.logits(images, batch.indices).cpu()
    return out
