"""Masked-image-modelling pretraining (MAE) on unlabeled images: the library behind ``birder-train-mim``.

Outputs in ``output_dir`` (``<mim>`` is e.g. ``mae_vit``, ``<network>`` e.g. ``vit_l16``):

- ``<network>_mim_<epoch>.pt``: the encoder alone (no head: ``class_to_idx {}``, outputs ``[0, 0]``), ready for
  ``birder.load_model(path, new_size=...)`` and fine-tuning;
- ``<mim>_<network>_<epoch>.pt``: the whole MAE model (encoder and decoder), read back by :func:`load_mim_model`;
- ``<mim>_<network>_<epoch>_states.pt`` (and ``..._step_states.pt`` every N steps): the training state to resume;
- ``mim_metrics.csv``: one row per epoch (loss, lr, unreadable images); ``mim_reconstruction_<epoch>.png``: a grid
  of original / masked / reconstructed images.
"""

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from birder.data.shards import DEFAULT_SHUFFLE_BUFFER, ShardStream, first_images, open_shards
from birder.data.training import EpochSampler, ImageDataset, list_images, mim_transform
from birder.data.transforms import classification_transform
from birder.distributed import DistInfo, distributed_session
from birder.errors import BirderError, CheckpointError, ImageDecodeError
from birder.io.checkpoint import ModelInfo, make_signature, read_checkpoint, write_checkpoint
from birder.io.images import load_image
from birder.io.outputs import check_training_folder
from birder.loading import load_state_into, save_model
from birder.model_registry import Task, registry
from birder.plots import save_image_rows
from birder.training.amp import amp_dtype, autocast
from birder.training.fsdp import full_state_dict
from birder.training.loop import BatchEvent, EpochProgress, RunSettings, build_trainer, start_run
from birder.training.metrics import MetricsCSV
from birder.training.setup import IndexedEpochs, resolve_rgb_stats, resolve_size, seed_everything
from birder.version import __version__

logger = logging.getLogger(__name__)

MIM_TASK = "masked_image_modeling"
METRICS_FILE = "mim_metrics.csv"
METRICS_FIELDS = ["epoch", "step", "loss", "lr", "unreadable_images"]


@dataclass
class MIMTrainConfig(RunSettings):
    """Settings of a pretraining run (defaults follow the published recipe where one exists: docs/compatibility.md,
    "MAE pretraining")."""

    output_dir: str | Path
    data_dirs: Sequence[str | Path] = ()  # folders of images (searched recursively), or:
    wds: str | Path | None = None  # WebDataset shards: a packed folder or a brace pattern (birder.data.shards)
    wds_shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    network: str = "vit_b16"
    mim_network: str = "mae_vit"
    model_config: Mapping[str, Any] | None = None  # encoder config override, e.g. {"hidden_dim": 64}
    mim_config: Mapping[str, Any] | None = None  # e.g. {"mask_ratio": 0.6, "decoder_depth": 4}
    size: int | tuple[int, int] = 224
    rgb_stats: str | Mapping[str, Sequence[float]] = "birder"
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1.5e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    min_scale: float = 0.3  # random resized crop area range
    drop_path: float = 0.0
    visualize: int = 8  # images in the per-epoch reconstruction grid (0: none)


@dataclass
class MIMTrainResult:
    epoch_losses: dict[int, float] = field(default_factory=dict)  # epochs trained by this call
    encoder_path: Path | None = None  # the last encoder written
    model_path: Path | None = None
    states_path: Path | None = None
    metrics_path: Path | None = None


def _stem(config: MIMTrainConfig) -> str:
    """File-name stem of the whole model and its states: ``mae_vit_vit_l16``."""
    return f"{config.mim_network}_{config.network}"


def save_mim_model(
    mae: nn.Module,
    path: str | Path,
    rgb_stats: Mapping[str, Sequence[float]],
    *,
    state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """The whole MIM model with the metadata needed to rebuild it (encoder network and both config overrides).

    ``state``: the weights to write instead of ``mae.state_dict()`` (a sharded model's, gathered whole)."""
    encoder = mae.encoder
    metadata = {
        "birder_version": f"v{__version__}",
        "task": MIM_TASK,
        "signature": make_signature(encoder.input_channels, encoder.size, 0),
        "class_to_idx": {},
        "rgb_stats": {key: list(value) for key, value in rgb_stats.items()},
        "network": mae.network_name,
        "encoder": encoder.network_name,
        "encoder_config": dict(encoder.config_override or {}),
        "config": dict(mae.config_override or {}),
    }
    return write_checkpoint(path, mae.state_dict() if state is None else state, metadata)


def load_mim_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A whole MIM model written by :func:`save_mim_model` (or Birder's, given its networks); returns the model
    and the file's metadata."""
    (state, metadata) = read_checkpoint(path)
    if metadata.get("task") != MIM_TASK or "encoder" not in metadata:
        raise CheckpointError(f"{path}: not a whole MIM model file (an encoder alone loads with birder.load_model)")

    signature = metadata["signature"]
    with torch.device("meta"):
        encoder = registry.net_factory(
            metadata["encoder"],
            0,
            signature["inputs"][0]["data_shape"][1],
            config=metadata.get("encoder_config") or None,
            size=tuple(signature["inputs"][0]["data_shape"][2:4]),
        )
        mae = registry.mim_net_factory(metadata["network"], encoder, config=metadata.get("config") or None)

    load_state_into(mae, state, str(path))  # duck-typed: MAE renames legacy keys and names itself like a BaseNet
    return (mae, metadata)


def _training_data(config: MIMTrainConfig, transform, dist: DistInfo) -> IndexedEpochs | ShardStream:
    """The unlabelled images: folders (``data_dirs``) or tar shards (``wds``), split over the ranks."""
    if (config.wds is None) == (not config.data_dirs):
        raise BirderError("pass the images either as folders (--data-dir) or as shards (--wds), one of the two")

    if config.wds is not None:
        shard_set = open_shards(config.wds)
        logger.info("%d unlabeled images in %d shards (%s)", shard_set.total, len(shard_set.shards), config.wds)
        return ShardStream(
            shard_set,
            transform,
            batch_size=config.batch_size,
            rank=dist.rank,
            world_size=dist.world_size,
            seed=config.seed,
            shuffle_buffer=config.wds_shuffle_buffer,
        )

    paths = list_images(config.data_dirs)
    logger.info("%d unlabeled images in %s", len(paths), ", ".join(map(str, config.data_dirs)))
    dataset = ImageDataset(paths, transform, seed=config.seed)
    sampler = EpochSampler(len(dataset), seed=config.seed, rank=dist.rank, world_size=dist.world_size)
    return IndexedEpochs(dataset, sampler, config.batch_size)


def _visual_batch(
    data: IndexedEpochs | ShardStream, config: MIMTrainConfig, size: tuple[int, int], rgb_stats
) -> torch.Tensor:
    """Readable images spread over the data set (the first ones of shards), resized as for inference: the same
    ones every epoch."""
    transform = classification_transform(size, rgb_stats)
    if isinstance(data, ShardStream):
        images = [transform(image) for image in first_images(data.shard_set, config.visualize)]
        return torch.stack(images) if images else torch.empty(0)

    paths = data.dataset.paths
    stride = max(1, len(paths) // max(config.visualize, 1))
    images = []
    for path in [*paths[::stride], *paths]:  # then any others, should some of the spread ones be unreadable
        if len(images) == config.visualize:
            break
        try:
            images.append(transform(load_image(path)))
        except ImageDecodeError:
            continue

    return torch.stack(images) if images else torch.empty(0)


def _save_reconstruction(
    mae: nn.Module, images: torch.Tensor, config: MIMTrainConfig, dist: DistInfo, rgb_stats, path: Path
) -> None:
    """Rank 0 writes the PNG; a sharded model's forward needs every rank, so under FSDP every rank calls this."""
    devices = [dist.device.index or 0] if dist.device.type == "cuda" else []
    # A fixed mask, drawn from a forked generator: the training random stream must not notice this.
    precision = amp_dtype(config.amp, dist.device)
    with torch.random.fork_rng(devices=devices), torch.no_grad(), autocast(dist.device, precision):
        torch.manual_seed(config.seed)
        was_training = mae.training
        mae.eval()
        images = images.to(dist.device)
        output = mae(images)
        recon = mae.reconstruct(images, output.pred, output.mask)
        mae.train(was_training)

    if dist.is_main:
        save_image_rows([images, recon.masked, recon.pasted], rgb_stats, path)


def train_mim(config: MIMTrainConfig, *, on_batch: Callable[[BatchEvent], None] | None = None) -> MIMTrainResult:
    """Pretrain ``config.network`` with ``config.mim_network`` on the images under ``config.data_dirs``.

    Runs as one process, or as one rank of a ``torchrun`` job (DDP). ``on_batch`` is called after every batch.
    """
    with distributed_session(config.device) as dist:
        return _train_mim(config, dist, on_batch)


def _train_mim(config: MIMTrainConfig, dist: DistInfo, on_batch: Callable[[BatchEvent], None] | None) -> MIMTrainResult:
    if not registry.exists(config.mim_network, task=Task.MASKED_IMAGE_MODELING):
        known = ", ".join(registry.list_models(task=Task.MASKED_IMAGE_MODELING))
        raise BirderError(f"unknown MIM network '{config.mim_network}' (known: {known})")

    output_dir = Path(config.output_dir)
    check_training_folder(output_dir, config.resume, config.data_dirs)  # before anything slow: the data, the model
    seed_everything(config.seed)  # the same on every rank: identical initial weights (and EMA copies)
    size = resolve_size(config.size)
    rgb_stats = resolve_rgb_stats(config.rgb_stats)
    registry.network_config(config.network)  # an unknown name fails here, before any slow step
    data = _training_data(config, mim_transform(size, rgb_stats, config.min_scale), dist)

    encoder = registry.net_factory(config.network, 0, config=config.model_config, size=size)
    encoder.set_drop_path_rate(config.drop_path)
    mae = registry.mim_net_factory(config.mim_network, encoder, config=config.mim_config).to(dist.device)
    trainer = build_trainer(
        mae,
        config,
        dist=dist,
        samples_per_rank=data.samples_per_rank,
        loss_fn=lambda model, batch: model(batch.images).loss,
        stem=_stem(config),
        identity=_identity(config),
        on_batch=on_batch,
    )
    metrics = MetricsCSV(output_dir / METRICS_FILE, METRICS_FIELDS)
    (epochs, progress) = start_run(trainer, config, stem=_stem(config), identity=_identity(config), metrics=[metrics])
    visual = torch.empty(0)
    # Every rank of an FSDP run takes part in the reconstruction's forward (the same images on each).
    if (dist.is_main or trainer.fsdp) and config.visualize > 0:
        visual = _visual_batch(data, config, size, rgb_stats)

    result = MIMTrainResult(metrics_path=metrics.path)
    for epoch in epochs:
        if progress is None or progress.epoch != epoch:
            progress = EpochProgress(epoch)
        summary = trainer.run_epoch(data, progress, workers=config.workers)
        result.epoch_losses[epoch] = summary.loss
        logger.info(
            "epoch %d/%d: loss %.4f, lr %.3g, %.1f images/s per process%s",
            epoch,
            config.epochs,
            summary.loss,
            summary.lr,
            summary.images_per_s,
            f", {summary.unreadable} unreadable images skipped" if summary.unreadable else "",
        )

        if visual.numel():
            png = output_dir / f"mim_reconstruction_{epoch}.png"
            _save_reconstruction(mae, visual, config, dist, rgb_stats, png)
        if dist.is_main:
            metrics.append(
                {
                    "epoch": epoch,
                    "step": trainer.global_step,
                    "loss": summary.loss,
                    "lr": summary.lr,
                    "unreadable_images": summary.unreadable,
                }
            )

        if epoch % config.save_every == 0 or epoch == epochs[-1]:
            # Whole weights on rank 0 (gathered from the shards under FSDP: every rank takes part), then dropped
            # before the training state is written.
            weights = full_state_dict(mae, dist)
            if dist.is_main:
                _save_models(mae, weights, config, output_dir, epoch, rgb_stats, result)
            del weights
            states_path = output_dir / f"{_stem(config)}_{epoch}_states.pt"
            trainer.save_state(states_path, progress, epoch_complete=True, extra=_identity(config))
            result.states_path = states_path if dist.is_main else None

        progress = None

    return result


def _identity(config: MIMTrainConfig) -> dict[str, Any]:
    """What a state file must match to be resumed by this run."""
    return {"kind": "mim", "network": config.network, "mim_network": config.mim_network}


def _save_models(
    mae: nn.Module,
    weights: Mapping[str, torch.Tensor],
    config: MIMTrainConfig,
    output_dir: Path,
    epoch: int,
    rgb_stats,
    result: MIMTrainResult,
) -> None:
    """The encoder alone and the whole model, from the whole model's ``weights`` (the encoder's are a view of them,
    not a copy)."""
    encoder = mae.encoder
    encoder_weights = {
        key.removeprefix("encoder."): value for key, value in weights.items() if key.startswith("encoder.")
    }
    info = ModelInfo({}, make_signature(encoder.input_channels, encoder.size, 0), rgb_stats)
    encoder_path = output_dir / f"{config.network}_mim_{epoch}.pt"
    result.encoder_path = save_model(encoder, encoder_path, info, task=MIM_TASK, state=encoder_weights)
    result.model_path = save_mim_model(mae, output_dir / f"{_stem(config)}_{epoch}.pt", rgb_stats, state=weights)
    logger.info("saved %s and %s", result.encoder_path, result.model_path)
