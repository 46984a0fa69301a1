"""Training a detector on COCO-format annotations: the library behind ``birder-train-det``.

The backbone starts from a classifier or MIM encoder checkpoint (``init``; its position embedding resized to the
detector's size), or from scratch; it trains with layer-wise lr decay (``layer_decay``) or stays frozen
(``freeze_backbone``). The loop is the classifiers' (:mod:`birder.training.loop`: AMP, EMA, clipping,
accumulation, exact resume, DDP, step checkpoints). Every epoch is scored on the validation file (COCO mAP).

Outputs in ``output_dir`` (``<stem>`` is ``<network>_<backbone>``, e.g. ``faster_rcnn_vit_b16``):

- ``<stem>_<epoch>.pt``: the detector (EMA weights when EMA is on), for
  :func:`birder.net.detection.checkpoint.load_detector`, ``birder-eval-det`` and ``birder-predict --detector``;
- ``<stem>_<epoch>_states.pt`` (and ``<stem>_step_states.pt`` every N steps): the training state to resume;
- ``det_metrics.csv`` (loss, mAP, mAP@.5 per epoch) and ``det_per_class_ap.csv`` (AP and AP@.5 per epoch and class).
"""

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from birder.data.detection import CocoData, DetectionDataset, collate_detection, detection_train_transform, read_coco
from birder.data.training import EpochSampler, TrainingBatch
from birder.distributed import DistInfo, distributed_session
from birder.errors import BirderError
from birder.io.checkpoint import ModelInfo, make_signature
from birder.io.outputs import check_training_folder
from birder.loading import load_model
from birder.model_registry import Task, registry
from birder.net.detection.base import DetectionBaseNet
from birder.net.detection.checkpoint import save_detector
from birder.training.detection_augment import CopyPasteDataset
from birder.training.detection_eval import DetectionEvalResult, evaluate_detector
from birder.training.loop import BatchEvent, EpochProgress, RunSettings, build_trainer, start_run
from birder.training.metrics import MetricsCSV
from birder.training.setup import IndexedEpochs, resolve_rgb_stats, resolve_size, seed_everything
from birder.training.state import save_training_state

logger = logging.getLogger(__name__)

METRICS_FILE = "det_metrics.csv"
PER_CLASS_FILE = "det_per_class_ap.csv"
METRICS_FIELDS = ["epoch", "step", "lr", "train_loss", "map", "map50", "unreadable_images"]


@dataclass
class DetectionTrainConfig(RunSettings):
    """Settings of a detector run. ``train_images`` / ``val_images``: the folders the files' ``file_name`` s are
    relative to (default: each annotation file's folder)."""

    train_json: str | Path
    val_json: str | Path
    output_dir: str | Path
    train_images: str | Path | None = None
    val_images: str | Path | None = None
    network: str = "faster_rcnn"
    model_config: Mapping[str, Any] | None = None  # the head's config override
    backbone: str | None = None  # needed from scratch; else the init checkpoint's network
    backbone_config: Mapping[str, Any] | None = None
    init: str | Path | None = None  # a classifier or MIM encoder checkpoint
    freeze_backbone: bool = False
    size: int | tuple[int, int] = 512
    rgb_stats: str | Mapping[str, Sequence[float]] | None = None  # default: the init checkpoint's, else "birder"
    scale_range: tuple[float, float] = (0.5, 1.5)  # scale jitter (relative to the size)
    hflip: float = 0.5
    # Probability that a training photo gets boxes of another pasted beside and over its own objects
    # (birder.training.detection_augment): groups of touching and partly hidden animals to learn counting from
    copy_paste: float = 0.0
    epochs: int = 24
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float | None = None
    ema_decay: float | None = None
    drop_path: float | None = None


@dataclass
class DetectionTrainResult:
    class_to_idx: dict[str, int] = field(default_factory=dict)
    epoch_losses: dict[int, float] = field(default_factory=dict)
    validation: dict[int, DetectionEvalResult] = field(default_factory=dict)
    model_path: Path | None = None
    states_path: Path | None = None
    metrics_path: Path | None = None


def build_detector(config: DetectionTrainConfig, num_classes: int) -> tuple[DetectionBaseNet, dict[str, Any]]:
    """The detector to train and its ``rgb_stats``: the backbone from ``config.init`` or from scratch."""
    if not registry.exists(config.network, task=Task.OBJECT_DETECTION):
        known = ", ".join(registry.list_models(task=Task.OBJECT_DETECTION))
        raise BirderError(f"unknown detection network '{config.network}' (known: {known})")

    size = resolve_size(config.size)
    if config.init is None:
        if config.backbone is None:
            raise BirderError("pass a backbone to train from scratch (e.g. vit_b16), or a checkpoint to start from")
        backbone = registry.net_factory(config.backbone, 0, config=config.backbone_config, size=size)
        rgb_stats = resolve_rgb_stats(config.rgb_stats or "birder")
    else:
        (backbone, info) = load_model(
            config.init, network=config.backbone, custom_config=config.backbone_config, new_size=size
        )
        rgb_stats = resolve_rgb_stats(config.rgb_stats if config.rgb_stats is not None else info.rgb_stats)
        logger.info("backbone %s from %s", backbone.network_name, config.init)

    net = registry.detection_net_factory(config.network, num_classes, backbone, config=config.model_config, size=size)
    return (net, rgb_stats)


def train_detector(
    config: DetectionTrainConfig, *, on_batch: Callable[[BatchEvent], None] | None = None
) -> DetectionTrainResult:
    """Train a detector as ``config`` says, in one process or as one rank of a ``torchrun`` job (DDP)."""
    with distributed_session(config.device) as dist:
        return _train_detector(config, dist, on_batch)


def _read_data(config: DetectionTrainConfig) -> tuple[CocoData, CocoData]:
    train = read_coco(config.train_json, config.train_images)
    if train.num_boxes == 0:
        raise BirderError(f"{config.train_json}: no usable box to learn from ({len(train.problems)} bad items)")
    val = read_coco(config.val_json, config.val_images, class_to_idx=train.class_to_idx)
    logger.info(
        "%d training images (%d boxes), %d validation images (%d boxes), %d classes",
        len(train.images),
        train.num_boxes,
        len(val.images),
        val.num_boxes,
        len(train.class_to_idx),
    )
    return (train, val)


def _loss(model: torch.nn.Module, batch: TrainingBatch) -> torch.Tensor:
    losses = model(list(batch.images), batch.targets)
    return sum(losses.values())


def _train_detector(
    config: DetectionTrainConfig, dist: DistInfo, on_batch: Callable[[BatchEvent], None] | None
) -> DetectionTrainResult:
    if config.fsdp:
        raise BirderError("--fsdp is for birder-train and birder-train-mim: detectors train with DDP")
    if not 0.0 <= config.copy_paste <= 1.0:
        raise BirderError(f"--copy-paste must be a probability from 0 to 1, got {config.copy_paste}")
    output_dir = Path(config.output_dir)
    check_training_folder(output_dir, config.resume)  # before anything slow: the data, the model
    seed_everything(config.seed)  # the same on every rank: identical initial weights (and EMA copies)
    (train_data, val_data) = _read_data(config)
    class_to_idx = train_data.class_to_idx
    (net, rgb_stats) = build_detector(config, len(class_to_idx))
    if config.drop_path is not None:
        net.set_drop_path_rate(config.drop_path)
    if config.freeze_backbone:
        net.set_drop_path_rate(0.0)  # a frozen backbone is a fixed feature extractor
        net.freeze_backbone()
    net = net.to(dist.device)
    stem = f"{net.network_name}_{net.backbone_name}"
    size = tuple(net.size)

    transform = detection_train_transform(size, rgb_stats, tuple(config.scale_range), config.hflip)
    train_set: DetectionDataset | CopyPasteDataset = DetectionDataset(
        train_data.images, transform, train=True, seed=config.seed
    )
    if config.copy_paste > 0:
        train_set = CopyPasteDataset(train_set, config.copy_paste, seed=config.seed)
    sampler = EpochSampler(len(train_set), seed=config.seed, rank=dist.rank, world_size=dist.world_size)
    identity = {
        "kind": "detection",
        "network": net.network_name,
        "backbone": net.backbone_name,
        "class_to_idx": dict(class_to_idx),
    }
    train = IndexedEpochs(train_set, sampler, config.batch_size, collate_detection)
    trainer = build_trainer(
        net,
        config,
        dist=dist,
        samples_per_rank=train.samples_per_rank,
        loss_fn=_loss,
        stem=stem,
        identity=identity,
        on_batch=on_batch,
    )
    metrics = MetricsCSV(output_dir / METRICS_FILE, METRICS_FIELDS)
    per_class = MetricsCSV(output_dir / PER_CLASS_FILE, ["epoch", "class", "ap", "ap50", "boxes"])
    (epochs, progress) = start_run(trainer, config, stem=stem, identity=identity, metrics=[metrics, per_class])

    result = DetectionTrainResult(class_to_idx=dict(class_to_idx), metrics_path=metrics.path)
    for epoch in epochs:
        if progress is None or progress.epoch != epoch:
            progress = EpochProgress(epoch)
        summary = trainer.run_epoch(train, progress, workers=config.workers)
        result.epoch_losses[epoch] = summary.loss

        evaluated = trainer.saved_model
        (validation, val_unreadable) = evaluate_detector(
            evaluated,
            val_data,
            dist=dist,
            size=size,
            rgb_stats=rgb_stats,
            batch_size=config.batch_size,
            workers=min(config.workers, 2),
            amp_dtype=trainer.amp_dtype,
            progress_bar=config.progress_bar,
        )
        if validation is not None:
            result.validation[epoch] = validation
            logger.info(
                "epoch %d/%d: train loss %.4f, val mAP %.4f, mAP@.5 %.4f, lr %.3g, %.1f images/s per process",
                epoch,
                config.epochs,
                summary.loss,
                validation.map,
                validation.map50,
                summary.lr,
                summary.images_per_s,
            )
            metrics.append(
                {
                    "epoch": epoch,
                    "step": trainer.global_step,
                    "lr": summary.lr,
                    "train_loss": summary.loss,
                    "map": validation.map,
                    "map50": validation.map50,
                    "unreadable_images": len(summary.unreadable_files | val_unreadable),
                }
            )
            per_class.append(
                *(
                    {"epoch": epoch, "class": c.name, "ap": c.ap, "ap50": c.ap50, "boxes": c.boxes}
                    for c in validation.per_class
                )
            )

        if epoch % config.save_every == 0 or epoch == epochs[-1]:
            state = {**trainer.state_dict(progress, epoch_complete=True), **identity}
            if dist.is_main:
                info = ModelInfo(
                    dict(class_to_idx), make_signature(net.input_channels, size, net.num_classes), rgb_stats
                )
                result.model_path = save_detector(evaluated, output_dir / f"{stem}_{epoch}.pt", info)
                result.states_path = save_training_state(output_dir / f"{stem}_{epoch}_states.pt", state)
                logger.info("saved %s", result.model_path)

        progress = None

    return result
