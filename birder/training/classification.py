"""Supervised training of a classifier: the library behind ``birder-train``.

Starts from scratch, from an MIM encoder (``<network>_mim_<epoch>.pt``: its position embedding is resized to the
training size and a new head is made for the data set's classes) or from a classifier checkpoint (its head is kept
when the classes are the same). Outputs in ``output_dir`` (``<stem>`` is ``<network>`` or ``<network>_<tag>``):

- ``<stem>_<epoch>.pt``: the classifier (EMA weights when EMA is on) with ``class_to_idx``, ``signature`` and
  ``rgb_stats``: ``birder.load_model(path)`` and ``birder-predict`` use it as it is;
- ``<stem>_<epoch>_states.pt`` (and ``<stem>_step_states.pt`` every N steps): the training state to resume;
- ``metrics.csv`` (one row per epoch), ``per_class_metrics.csv`` (precision / recall per epoch and class),
  ``confusion_matrix.csv`` and ``confusion_matrix.png`` (the last epoch's validation).
"""

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from birder.data.shards import DEFAULT_SHUFFLE_BUFFER, ShardSet, ShardStream, open_shards
from birder.data.training import (
    EpochBatches,
    EpochSampler,
    ImageDataset,
    LabeledFiles,
    TrainingBatch,
    class_balanced_weights,
    csv_files,
    image_folder_files,
    training_transform,
)
from birder.data.transforms import classification_transform
from birder.distributed import DistInfo, distributed_session
from birder.errors import BirderError
from birder.io.checkpoint import DEFAULT_TASK, ModelInfo, names_by_index
from birder.io.outputs import check_training_folder
from birder.loading import load_model, save_model
from birder.model_registry import registry
from birder.net.base import BaseNet
from birder.training.distillation import DistillSettings, Teacher, attach_cache, load_teacher
from birder.training.evaluation import EvalResult, evaluate, write_eval_outputs
from birder.training.fsdp import full_state_dict
from birder.training.loop import BatchEvent, EpochProgress, EpochSummary, RunSettings, build_trainer, start_run
from birder.training.metrics import MetricsCSV
from birder.training.mixup import MixupCutmix, soft_target_cross_entropy
from birder.training.setup import IndexedEpochs, make_loader, resolve_rgb_stats, resolve_size, seed_everything

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"
PER_CLASS_FILE = "per_class_metrics.csv"


@dataclass
class TrainConfig(RunSettings):
    """Settings of a supervised run. Data: ``data_dir`` with ``train/`` and ``val/`` ImageFolder layouts, or
    explicit ``train_dir`` / ``val_dir``, or ``train_csv`` / ``val_csv`` files of ``path,label`` rows."""

    output_dir: str | Path
    data_dir: str | Path | None = None
    train_dir: str | Path | None = None
    val_dir: str | Path | None = None
    train_csv: str | Path | None = None
    val_csv: str | Path | None = None
    wds: str | Path | None = None  # WebDataset shards: a packed folder or a brace pattern (birder.data.shards)
    val_wds: str | Path | None = None
    wds_shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    network: str | None = None  # needed from scratch, or for a file that does not name its network
    model_config: Mapping[str, Any] | None = None
    init: str | Path | None = None  # an MIM encoder or classifier checkpoint
    reset_head: bool = False  # a new head even when the init checkpoint has the same classes
    tag: str | None = None
    size: int | tuple[int, int] | None = None  # default: the init checkpoint's size, else 224
    rgb_stats: str | Mapping[str, Sequence[float]] | None = None  # default: the init checkpoint's, else "birder"
    epochs: int = 50
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float | None = None
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    ema_decay: float | None = None
    aug_level: int = 2
    class_balanced: bool = False
    freeze_body: bool = False  # linear probe: only the head trains
    drop_path: float | None = None  # default: the network's own rate
    top_k: int = 5
    # Knowledge distillation from a trained classifier of the same classes (birder.training.distillation)
    teacher: str | Path | None = None
    distill: str | None = None  # soft (default with a teacher) or hard
    distill_temperature: float = 2.0
    distill_alpha: float = 0.5
    teacher_cache: str | Path | None = None  # a file of the teacher's logits (deterministic inputs only)


@dataclass
class TrainResult:
    class_to_idx: dict[str, int] = field(default_factory=dict)
    epoch_losses: dict[int, float] = field(default_factory=dict)  # epochs trained by this call
    validation: dict[int, EvalResult] = field(default_factory=dict)
    model_path: Path | None = None  # the last classifier written
    states_path: Path | None = None
    metrics_path: Path | None = None
    confusion_matrix_path: Path | None = None


# Training or validation data: labelled files (folders, CSV) or WebDataset shards.
DataSource = LabeledFiles | ShardSet


def _data_sources(config: TrainConfig) -> tuple[DataSource, DataSource]:
    """The training data and the validation data, with the training classes (checked to cover validation's)."""
    train = _train_source(config)
    class_to_idx = _classes_of(train)
    if config.val_wds is not None:
        return (train, _labeled_shards(config.val_wds, "--val-wds"))
    if config.val_csv is not None:
        return (train, csv_files(config.val_csv, class_to_idx))

    data_dir = Path(config.data_dir) if config.data_dir is not None else None
    val_dir = config.val_dir or (data_dir / "val" if data_dir is not None else None)
    if val_dir is None:
        raise BirderError("no validation data: pass --val-dir, --val-csv or --val-wds (evaluated every epoch)")
    if not Path(val_dir).is_dir():
        raise BirderError(f"{val_dir}: no validation folder (expected {val_dir}/<class name>/<images>)")
    return (train, image_folder_files(val_dir, class_to_idx))


def _train_source(config: TrainConfig) -> DataSource:
    if config.wds is not None:
        return _labeled_shards(config.wds, "--wds")
    if config.train_csv is not None:
        if config.val_csv is None and config.val_wds is None:
            raise BirderError("--train-csv needs a --val-csv (a held-out split to evaluate on every epoch)")
        return csv_files(config.train_csv)

    data_dir = Path(config.data_dir) if config.data_dir is not None else None
    train_dir = config.train_dir or (data_dir / "train" if data_dir is not None else None)
    if train_dir is None:
        raise BirderError("no data: pass a data folder with train/ and val/ sub-folders, CSV label files or --wds")
    return image_folder_files(train_dir)


def _labeled_shards(spec: str | Path, option: str) -> ShardSet:
    shard_set = open_shards(spec)
    if shard_set.class_names is None:
        raise BirderError(
            f"{option} {spec}: the shards have no class names (pack labelled photos with python -m birder.tools "
            "pack --labels, which writes them in index.json)"
        )
    return shard_set


def _classes_of(source: DataSource) -> dict[str, int]:
    return dict(source.class_to_idx)


def _size_of(source: DataSource) -> int:
    return source.total if isinstance(source, ShardSet) else len(source.paths)


def build_classifier(config: TrainConfig, class_to_idx: Mapping[str, int]) -> tuple[BaseNet, dict[str, Any]]:
    """The network to train and its ``rgb_stats``: from scratch, or from ``config.init`` (new head if needed)."""
    num_classes = len(class_to_idx)
    size = resolve_size(config.size) if config.size is not None else None
    if config.init is None:
        if config.network is None:
            raise BirderError("pass a network to train from scratch (e.g. vit_b16), or a checkpoint to start from")
        net = registry.net_factory(config.network, num_classes, config=config.model_config, size=size or (224, 224))
        return (net, resolve_rgb_stats(config.rgb_stats or "birder"))

    (net, info) = load_model(config.init, network=config.network, custom_config=config.model_config, new_size=size)
    same_classes = net.num_classes == num_classes and dict(info.class_to_idx) == dict(class_to_idx)
    if config.reset_head or not same_classes:
        net.reset_classifier(num_classes)
        logger.info("%s: new %d-class head on the %s body", config.init, num_classes, net.network_name)

    rgb_stats = resolve_rgb_stats(config.rgb_stats if config.rgb_stats is not None else info.rgb_stats)
    return (net, rgb_stats)


def train_classifier(config: TrainConfig, *, on_batch: Callable[[BatchEvent], None] | None = None) -> TrainResult:
    """Train a classifier as ``config`` says, in one process or as one rank of a ``torchrun`` job (DDP)."""
    with distributed_session(config.device) as dist:
        return _train_classifier(config, dist, on_batch)


@dataclass
class _Data:
    class_names: list[str]
    train: EpochBatches
    train_set: ImageDataset | None  # files only: the teacher's logits cache needs indexed samples
    val_loader: Iterable[TrainingBatch]


def _data(config: TrainConfig, sources: tuple[DataSource, DataSource], size, rgb_stats, dist: DistInfo) -> _Data:
    """Training batches (augmented, split over ranks, optionally class-balanced) and validation batches
    (inference transform, each image once over all ranks)."""
    (train_source, val_source) = sources
    class_to_idx = _classes_of(train_source)
    class_names = names_by_index(class_to_idx)
    transform = training_transform(size, rgb_stats, config.aug_level)
    (rank, world_size) = (dist.rank, dist.world_size)
    train_set = None
    if isinstance(train_source, ShardSet):
        if config.class_balanced:
            raise BirderError("--class-balanced needs random access to the samples: train from folders or CSV files")
        train: EpochBatches = ShardStream(
            train_source,
            transform,
            batch_size=config.batch_size,
            rank=rank,
            world_size=world_size,
            seed=config.seed,
            shuffle_buffer=config.wds_shuffle_buffer,
        )
    else:
        train_set = ImageDataset(train_source.paths, transform, train_source.targets, seed=config.seed)
        weights = class_balanced_weights(train_source.targets) if config.class_balanced else None
        sampler = EpochSampler(len(train_set), seed=config.seed, rank=rank, world_size=world_size, weights=weights)
        train = IndexedEpochs(train_set, sampler, config.batch_size)

    transform = classification_transform(size, rgb_stats)
    if isinstance(val_source, ShardSet):
        stream = ShardStream(
            val_source,
            transform,
            batch_size=config.batch_size,
            rank=rank,
            world_size=world_size,
            shuffle=False,
            class_to_idx=class_to_idx,
        )
        val_loader: Iterable[TrainingBatch] = stream.loader(0, 0, config.workers, dist.device)
    else:
        val_set = ImageDataset(val_source.paths, transform, val_source.targets, replace_unreadable=False)
        val_sampler = EpochSampler(len(val_set), shuffle=False, rank=rank, world_size=world_size, pad=False)
        val_loader = make_loader(val_set, val_sampler, config.batch_size, config.workers, dist.device)
    return _Data(class_names, train, train_set, val_loader)


def _loss_fn(
    config: TrainConfig, num_classes: int, teacher: Teacher | None = None
) -> Callable[[nn.Module, TrainingBatch], torch.Tensor]:
    mixing = MixupCutmix(num_classes, config.mixup_alpha, config.cutmix_alpha, config.label_smoothing)

    def loss_fn(model: nn.Module, batch: TrainingBatch) -> torch.Tensor:
        if mixing.enabled:
            (images, soft_targets) = mixing(batch.images, batch.targets)
            logits = model(images)
            loss = soft_target_cross_entropy(logits, soft_targets)
        else:
            (images, logits) = (batch.images, model(batch.images))
            loss = F.cross_entropy(logits, batch.targets, label_smoothing=config.label_smoothing)
        if teacher is not None:  # the teacher sees the very images the student saw (mixed ones included)
            loss = teacher.loss(loss, logits, images, batch.indices)
        return loss

    return loss_fn


def _distill_settings(config: TrainConfig) -> DistillSettings | None:
    """The distillation the config asks for (checked), or None."""
    if config.teacher is None:
        if config.distill is not None or config.teacher_cache is not None:
            raise BirderError("--distill and --teacher-cache need a --teacher (a trained classifier checkpoint)")
        return None

    settings = DistillSettings(
        config.teacher, config.distill or "soft", config.distill_temperature, config.distill_alpha, config.teacher_cache
    )
    random_aug = config.aug_level != 0 or config.mixup_alpha > 0 or config.cutmix_alpha > 0
    settings.check(random_inputs=random_aug)
    return settings


def _teacher(
    config: TrainConfig,
    net: BaseNet,
    data: "_Data",
    class_to_idx: Mapping[str, int],
    rgb_stats: Mapping[str, Sequence[float]],
    dist: DistInfo,
) -> Teacher | None:
    """The distillation teacher (with its logits cache when asked for), or None without ``config.teacher``."""
    settings = _distill_settings(config)
    if settings is None:
        return None

    teacher = load_teacher(
        settings, class_to_idx=class_to_idx, size=tuple(net.size), rgb_stats=rgb_stats, device=dist.device
    )
    if settings.cache is not None:
        if data.train_set is None:
            raise BirderError("--teacher-cache needs indexed samples: train from folders or CSV files, or drop it")
        attach_cache(teacher, data.train_set, config.batch_size, config.workers, dist)
    return teacher


def _train_classifier(
    config: TrainConfig, dist: DistInfo, on_batch: Callable[[BatchEvent], None] | None
) -> TrainResult:
    output_dir = Path(config.output_dir)
    # Before anything slow: the data, the model
    image_folders = [config.train_dir, config.val_dir]
    if config.data_dir is not None:  # only its train/ and val/ are read
        image_folders += [Path(config.data_dir) / "train", Path(config.data_dir) / "val"]
    check_training_folder(output_dir, config.resume, image_folders)
    seed_everything(config.seed)  # the same on every rank: identical initial weights (and EMA copies)
    sources = _data_sources(config)
    class_to_idx = _classes_of(sources[0])
    logger.info(
        "%d training, %d validation images, %d classes", _size_of(sources[0]), _size_of(sources[1]), len(class_to_idx)
    )

    (net, rgb_stats) = build_classifier(config, class_to_idx)
    if config.drop_path is not None:
        net.set_drop_path_rate(config.drop_path)
    if config.freeze_body:
        net.set_drop_path_rate(0.0)  # a frozen body is a fixed feature extractor
        net.freeze(freeze_classifier=False)
    net = net.to(dist.device)
    stem = net.network_name + (f"_{config.tag}" if config.tag else "")
    data = _data(config, sources, tuple(net.size), rgb_stats, dist)
    teacher = _teacher(config, net, data, class_to_idx, rgb_stats, dist)

    identity = {"kind": "classification", "network": net.network_name, "class_to_idx": dict(class_to_idx)}
    loss_fn = _loss_fn(config, len(class_to_idx), teacher)
    trainer = build_trainer(
        net,
        config,
        dist=dist,
        samples_per_rank=data.train.samples_per_rank,
        loss_fn=loss_fn,
        stem=stem,
        identity=identity,
        on_batch=on_batch,
    )
    metrics = MetricsCSV(output_dir / METRICS_FILE, _metric_fields(config.top_k, len(class_to_idx)))
    per_class = MetricsCSV(output_dir / PER_CLASS_FILE, ["epoch", "class", "precision", "recall", "support"])
    (epochs, progress) = start_run(trainer, config, stem=stem, identity=identity, metrics=[metrics, per_class])

    result = TrainResult(class_to_idx=dict(class_to_idx), metrics_path=metrics.path)
    validation: EvalResult | None = None
    for epoch in epochs:
        if progress is None or progress.epoch != epoch:
            progress = EpochProgress(epoch)
        summary = trainer.run_epoch(data.train, progress, workers=config.workers)
        result.epoch_losses[epoch] = summary.loss

        evaluated = trainer.saved_model
        (validation, val_unreadable) = evaluate(
            evaluated,
            data.val_loader,
            dist=dist,
            class_names=data.class_names,
            amp_dtype=trainer.amp_dtype,
            top_k=config.top_k,
            progress_bar=config.progress_bar,
        )
        result.validation[epoch] = validation
        _log_epoch(epoch, config.epochs, summary, validation)
        if dist.is_main:
            metrics.append(_metrics_row(epoch, trainer.global_step, summary, validation, val_unreadable))
            per_class.append(*_per_class_rows(epoch, validation))

        if epoch % config.save_every == 0 or epoch == epochs[-1]:
            # Whole weights on rank 0 (gathered from the shards under FSDP: every rank takes part), then dropped
            # before the training state is written.
            weights = full_state_dict(evaluated, dist)
            if dist.is_main:
                info = ModelInfo(dict(class_to_idx), None, rgb_stats)
                model_path = output_dir / f"{stem}_{epoch}.pt"
                result.model_path = save_model(evaluated, model_path, info, task=DEFAULT_TASK, state=weights)
                logger.info("saved %s", result.model_path)
            del weights
            states_path = output_dir / f"{stem}_{epoch}_states.pt"
            trainer.save_state(states_path, progress, epoch_complete=True, extra=identity)
            result.states_path = states_path if dist.is_main else None

        progress = None

    if dist.is_main and validation is not None:
        result.confusion_matrix_path = write_eval_outputs(validation, output_dir, per_class_csv=False)

    return result


def _log_epoch(epoch: int, epochs: int, summary: EpochSummary, validation: EvalResult) -> None:
    logger.info(
        "epoch %d/%d: train loss %.4f, val loss %.4f, top-1 %.4f, top-%d %.4f, ECE %.4f, lr %.3g, "
        "%.1f images/s per process%s",
        epoch,
        epochs,
        summary.loss,
        validation.loss,
        validation.top1,
        validation.k,
        validation.top_k,
        validation.ece,
        summary.lr,
        summary.images_per_s,
        f", {summary.unreadable} unreadable training images replaced" if summary.unreadable else "",
    )


def _metrics_row(
    epoch: int, step: int, summary: EpochSummary, validation: EvalResult, val_unreadable: frozenset[str]
) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "step": step,
        "lr": summary.lr,
        "train_loss": summary.loss,
        "val_loss": validation.loss,
        "val_top1": validation.top1,
        f"val_top{validation.k}": validation.top_k,
        "val_ece": validation.ece,
        # Both sets are over all ranks; a file listed for training and validation alike is one file.
        "unreadable_images": len(summary.unreadable_files | val_unreadable),
    }


def _per_class_rows(epoch: int, validation: EvalResult) -> list[dict[str, Any]]:
    return [
        {"epoch": epoch, "class": c.name, "precision": c.precision, "recall": c.recall, "support": c.support}
        for c in validation.per_class
    ]


def _metric_fields(top_k: int, num_classes: int) -> list[str]:
    k = max(1, min(top_k, num_classes))
    return [
        "epoch",
        "step",
        "lr",
        "train_loss",
        "val_loss",
        "val_top1",
        f"val_top{k}",
        "val_ece",
        "unreadable_images",
    ]
