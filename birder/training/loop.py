"""The optimisation loop both trainers share: one epoch of forward/backward with gradient accumulation, AMP,
clipping, EMA and step checkpoints, plus the state needed to resume it exactly.

The trainer supplies a loss function ``loss_fn(model, batch) -> scalar`` (MAE reconstruction, cross-entropy with
mixup, ...); everything else is the same for every task.

:func:`build_trainer` and :func:`start_run` are the start-up both trainers share: a :class:`Trainer` set up as the
run's config says, then per-rank seeding and resume.
"""

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from birder.data.training import EpochBatches, TrainingBatch
from birder.distributed import DistInfo, all_gather_objects, all_reduce_sum
from birder.errors import BirderError, CheckpointError
from birder.io.outputs import refuse_unrelated_checkpoints
from birder.training import fsdp as sharding
from birder.training.amp import amp_dtype, autocast, grad_scaler
from birder.training.ddp import distinct_over_ranks, wrap_ddp
from birder.training.ema import ModelEMA
from birder.training.metrics import MetricsCSV
from birder.training.optim import build_optimizer, param_groups
from birder.training.schedule import epoch_cosine_schedule
from birder.training.setup import resolve_resume, seed_everything
from birder.training.state import capture_rng_state, load_training_state, restore_rng_state, save_training_state

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, TrainingBatch], torch.Tensor]
# How often (in batches) the progress bar shows the running loss: reading it waits for the device.
_LOSS_DISPLAY_INTERVAL = 10


@dataclass
class EpochProgress:
    """Where an epoch stands on this rank: enough to resume it mid-way with the same running loss."""

    epoch: int
    batches: int = 0  # micro-batches done
    loss_sum: float = 0.0  # sum over samples of the training loss
    samples: int = 0
    # The images that failed to decode (and were replaced), each once: their error messages, which name them.
    unreadable_files: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.unreadable_files = set(self.unreadable_files)  # a state file holds a list

    def state_dict(self) -> dict[str, Any]:
        return {**asdict(self), "unreadable_files": sorted(self.unreadable_files)}


@dataclass(frozen=True)
class BatchEvent:
    """Passed to ``on_batch`` after every batch (tests use it to check that no sample is seen twice or missed)."""

    epoch: int
    batch: int  # 1-based within the epoch
    step: int  # optimizer steps done so far
    indices: list[int]


@dataclass(frozen=True)
class EpochSummary:
    epoch: int
    loss: float  # mean training loss over all ranks
    samples: int
    unreadable_files: frozenset[str]  # over all ranks, each file once (error messages that name it)
    lr: float  # the largest group's lr at the end of the epoch
    images_per_s: float = math.nan  # this process's training throughput (data loading included)

    @property
    def unreadable(self) -> int:
        return len(self.unreadable_files)


class Trainer:
    """Owns the model as trained (compiled and/or wrapped in DDP, or sharded by FSDP), the optimizer and their
    schedule.

    ``fsdp``: ``model`` is already sharded (:func:`birder.training.fsdp.shard_model`, before the optimizer was
    built over its sharded parameters); training states are then saved sharded (:meth:`save_state`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        dist: DistInfo,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        loss_fn: LossFn,
        amp_dtype: torch.dtype | None = None,
        accumulation_steps: int = 1,
        clip_grad_norm: float | None = None,
        ema: ModelEMA | None = None,
        compile: bool = False,
        fsdp: bool = False,
        progress_bar: bool = True,
        save_every_steps: int | None = None,
        step_checkpoint: Callable[["Trainer", EpochProgress], None] | None = None,
        on_batch: Callable[[BatchEvent], None] | None = None,
    ) -> None:
        if accumulation_steps < 1:
            raise BirderError(f"gradient accumulation steps must be at least 1, got {accumulation_steps}")
        if fsdp:
            sharding.check_fsdp_run(dist, compile=compile)

        self.model = model  # the plain (or sharded) module: what is saved and what EMA follows
        self.dist = dist
        self.fsdp = fsdp
        self.ddp = model if fsdp else wrap_ddp(model, dist)
        self.train_model = torch.compile(self.ddp) if compile else self.ddp
        (self.optimizer, self.scheduler, self.scaler) = (optimizer, scheduler, scaler)
        (self.loss_fn, self.amp_dtype, self.ema) = (loss_fn, amp_dtype, ema)
        (self.accumulation_steps, self.clip_grad_norm) = (accumulation_steps, clip_grad_norm)
        (self.save_every_steps, self.step_checkpoint) = (save_every_steps, step_checkpoint)
        (self.progress_bar, self.on_batch) = (progress_bar, on_batch)
        self.global_step = 0
        self._reported_unreadable: set[str] = set()

    # One epoch

    def run_epoch(self, data: EpochBatches, progress: EpochProgress, *, workers: int) -> EpochSummary:
        """Train on what is left of epoch ``progress.epoch`` (all of it, or the rest of a resumed one)."""
        loader = data.loader(progress.epoch, progress.batches, workers, self.dist.device)
        (started, seen_before) = (time.perf_counter(), progress.samples)
        self.train_epoch(loader, progress, total_batches=math.ceil(data.samples_per_rank / data.batch_size))
        rate = (progress.samples - seen_before) / max(time.perf_counter() - started, 1e-9)
        return self.summarize(progress, rate)

    def train_epoch(self, loader: Iterable[TrainingBatch], progress: EpochProgress, total_batches: int) -> None:
        """Train on ``loader`` (which yields the batches left of the epoch), updating ``progress`` in place."""
        self.model.train()
        device = self.dist.device
        loss_sum = torch.tensor(progress.loss_sum, dtype=torch.float64, device=device)
        self.optimizer.zero_grad(set_to_none=True)
        bar = tqdm(
            total=total_batches,
            initial=progress.batches,
            desc=f"epoch {progress.epoch}",
            unit="batch",
            leave=False,
            disable=not (self.dist.is_main and self.progress_bar),
        )
        for batch in loader:
            progress.batches += 1
            self._report_unreadable(batch.unreadable, progress)
            group_start = (progress.batches - 1) // self.accumulation_steps * self.accumulation_steps
            group_size = min(self.accumulation_steps, total_batches - group_start)
            step_now = progress.batches - group_start == group_size

            batch = TrainingBatch(
                batch.indices, batch.images.to(device, non_blocking=True), _targets_to(batch.targets, device), []
            )
            # Between optimizer steps DDP need not all-reduce the gradients: they are only accumulated. FSDP
            # reduce-scatters every micro-batch, so that the accumulated gradients stay sharded (1/N the memory).
            unsynced = not (step_now or self.fsdp or not self.dist.distributed)
            sync = self.ddp.no_sync() if unsynced else contextlib.nullcontext()
            with sync:
                with autocast(device, self.amp_dtype):
                    loss = self.loss_fn(self.train_model, batch)
                self.scaler.scale(loss / group_size).backward()

            count = batch.images.shape[0]
            loss_sum += loss.detach().double() * count
            progress.samples += count
            if step_now:
                self._optimizer_step()
                if self.step_checkpoint is not None and self._checkpoint_due():
                    progress.loss_sum = float(loss_sum)
                    self.step_checkpoint(self, progress)

            if self.on_batch is not None:
                self.on_batch(BatchEvent(progress.epoch, progress.batches, self.global_step, batch.indices.tolist()))

            bar.update()
            if progress.batches % _LOSS_DISPLAY_INTERVAL == 0:
                self._check_finite(loss)
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{self.current_lr():.2e}")

        bar.close()
        progress.loss_sum = float(loss_sum)

    def _checkpoint_due(self) -> bool:
        return bool(self.save_every_steps) and self.global_step % self.save_every_steps == 0

    def _optimizer_step(self) -> None:
        if self.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)

        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.global_step += 1
        if self.ema is not None:
            self.ema.update(self.model)

    def _report_unreadable(self, messages: list[str], progress: EpochProgress) -> None:
        """Log each unreadable file the first time the run meets it; note it once per epoch in ``progress``."""
        for message in messages:
            if message not in self._reported_unreadable:
                self._reported_unreadable.add(message)
                logger.warning("skipped (unreadable): %s", message)
            progress.unreadable_files.add(message)

    def _check_finite(self, loss: torch.Tensor) -> None:
        if torch.isfinite(loss):
            return
        if self.scaler.is_enabled():
            # fp16: an overflow now and then is expected; the scaler skips that step and lowers its scale.
            logger.warning("non-finite fp16 loss at step %d (the gradient scaler skips such steps)", self.global_step)
            return

        raise BirderError(
            f"training loss is {loss.item()} at step {self.global_step}: lower the learning rate, add warm-up or "
            "gradient clipping (--clip-grad-norm), or use --amp bf16 instead of fp16"
        )

    @property
    def saved_model(self) -> nn.Module:
        """The weights that are evaluated and saved: the EMA copy when EMA is on, else the model."""
        return self.ema.module if self.ema is not None else self.model

    def current_lr(self) -> float:
        return max(group["lr"] for group in self.optimizer.param_groups)

    def summarize(self, progress: EpochProgress, images_per_s: float = math.nan) -> EpochSummary:
        """The epoch's mean loss and counts over every rank (collective calls: every rank must make them)."""
        totals = torch.tensor([progress.loss_sum, progress.samples], dtype=torch.float64, device=self.dist.device)
        all_reduce_sum(totals, self.dist)
        (loss_sum, samples) = totals.tolist()
        loss = loss_sum / samples if samples else math.nan
        unreadable = distinct_over_ranks(progress.unreadable_files, self.dist)
        return EpochSummary(progress.epoch, loss, int(samples), unreadable, self.current_lr(), images_per_s)

    # Resume

    def _run_state(self, progress: EpochProgress, epoch_complete: bool) -> dict[str, Any]:
        """The small part of a state: counters, schedule, scaler, every rank's RNG states (a collective call)."""
        return {
            "epoch": progress.epoch,
            "epoch_complete": epoch_complete,
            "global_step": self.global_step,
            "progress": progress.state_dict(),
            "world_size": self.dist.world_size,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": all_gather_objects(capture_rng_state(), self.dist),
        }

    def state_dict(self, progress: EpochProgress, epoch_complete: bool) -> dict[str, Any]:
        """Everything needed to continue exactly (a collective call: every rank's RNG state is gathered).

        Not for a sharded model, whose state no rank holds whole: :meth:`save_state` writes it.
        """
        if self.fsdp:
            raise BirderError("a sharded (FSDP) model's training state is written by Trainer.save_state")

        return {
            **self._run_state(progress, epoch_complete),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
        }

    def save_state(
        self, path: Path, progress: EpochProgress, *, epoch_complete: bool, extra: Mapping[str, Any]
    ) -> Path:
        """Write the training state to ``path`` (atomically), with ``extra`` (what a resume must match); a
        collective call. Sharded (FSDP): every rank writes its shards into a DCP folder beside ``path``, and
        ``path`` keeps the small things and names the folder."""
        if not self.fsdp:
            state = {**self.state_dict(progress, epoch_complete), **extra}
            if self.dist.is_main:
                save_training_state(path, state)
            return path

        ema_module = self.ema.module if self.ema is not None else None
        folder = sharding.save_shards(path, sharding.training_parts(self.model, self.optimizer, ema_module), self.dist)
        state = {
            **self._run_state(progress, epoch_complete),
            "ema": {"decay": self.ema.decay, "updates": self.ema.updates} if self.ema is not None else None,
            "sharded": {"folder": folder, "world_size": self.dist.world_size},
            **extra,
        }
        if self.dist.is_main:
            save_training_state(path, state)
            sharding.remove_stale_shards(path, keep=folder)
        return path

    def resume(self, path: Path, identity: Mapping[str, Any]) -> tuple[int, EpochProgress | None]:
        """Restore a state file of a run like this one (``identity``: the state keys that must match, e.g. the
        network). Returns the epoch to continue with and, for an unfinished epoch, how far it went."""
        state = load_training_state(path)
        found = {key: state.get(key) for key in identity}
        if found != dict(identity):
            raise CheckpointError(f"{path}: the state of another run ({found}), not of this one ({dict(identity)})")

        progress = self.load_state_dict(state, source=path)
        start_epoch = state["epoch"] + (0 if progress is not None else 1)
        logger.info("resuming from %s: epoch %d, step %d", path, start_epoch, self.global_step)
        return (start_epoch, progress)

    def load_state_dict(self, state: dict[str, Any], *, source: Path | None = None) -> EpochProgress | None:
        """Restore a :meth:`state_dict` (or a state file ``source`` written by :meth:`save_state`); returns the
        progress of an unfinished epoch, None after a whole one.

        States of FSDP and plain runs are interchangeable: a sharded state is read by a plain run (DCP gathers the
        whole tensors) and a plain one by a sharded run (each rank keeps its shards), on any number of processes.

        Call it last, once everything that draws random numbers while being built exists, so that the
        restored generators continue exactly where the interrupted run was.
        """
        if state.get("sharded") is not None:
            self._load_sharded(state, source)
        elif self.fsdp:
            sharding.restore_full_into_sharded(
                self.model, self.optimizer, self.ema.module if self.ema is not None else None, state
            )
            self._restore_ema_counters(state)
        else:
            self.model.load_state_dict(state["model"])
            if self.ema is not None and state["ema"] is not None:
                self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state["ema"] is None:
            logger.warning("the checkpoint has no EMA weights: EMA starts from the current weights")
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.global_step = state["global_step"]
        if state["world_size"] == self.dist.world_size:
            restore_rng_state(state["rng"][self.dist.rank])
        else:
            logger.warning(
                "resuming on %d processes a run saved on %d: the data order and random draws will differ",
                self.dist.world_size,
                state["world_size"],
            )

        if state["epoch_complete"]:
            return None

        return _progress_from_state(state["progress"])

    def _load_sharded(self, state: Mapping[str, Any], source: Path | None) -> None:
        if source is None:
            raise CheckpointError("a sharded training state is read from its file (Trainer.resume), not a dict")

        # Only what the state holds is asked for: a run with EMA resuming one without starts its EMA afresh.
        ema_module = self.ema.module if self.ema is not None and state["ema"] is not None else None
        parts = sharding.training_parts(self.model, self.optimizer, ema_module)
        sharding.load_shards(Path(source).parent / state["sharded"]["folder"], parts)
        sharding.restore_parts(self.model, self.optimizer, ema_module, parts)
        self._restore_ema_counters(state)

    def _restore_ema_counters(self, state: Mapping[str, Any]) -> None:
        if self.ema is not None and state["ema"] is not None:
            (self.ema.decay, self.ema.updates) = (state["ema"]["decay"], state["ema"]["updates"])


def _targets_to(targets: Any, device: torch.device) -> Any:
    """Class indices (a tensor), or one dict of tensors per image (detection boxes and labels), on ``device``."""
    if isinstance(targets, torch.Tensor):
        return targets.to(device)

    return [{key: value.to(device) for key, value in target.items()} for target in targets]


def _progress_from_state(saved: Mapping[str, Any]) -> EpochProgress:
    # States written before the unreadable files were listed hold a count instead ("unreadable"): dropped, as
    # it cannot tell which files it counted (the rest of that epoch counts what it meets).
    known = {f.name for f in fields(EpochProgress)}
    return EpochProgress(**{key: value for key, value in saved.items() if key in known})


# Start-up every trainer shares


@dataclass(kw_only=True)
class RunSettings:
    """Settings every trainer's config has, with the same defaults (keyword-only: each config lists its own data,
    network and schedule first, with the defaults of its task)."""

    stop_epoch: int | None = None  # stop (with a checkpoint) after this epoch, schedule still planned for `epochs`
    accumulation_steps: int = 1
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    clip_grad_norm: float | None = None
    amp: str | None = None  # "bf16" or "fp16"
    compile: bool = False
    fsdp: bool = False  # shard weights, gradients and optimizer state over the torchrun processes (FSDP2)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    workers: int = 4
    seed: int = 0
    save_every: int = 10  # epochs (the last epoch is always saved)
    save_every_steps: int | None = None  # optimizer steps (a rolling *_step_states.pt)
    resume: str | Path | None = None  # a *_states.pt file, or "latest"
    device: str | None = None
    progress_bar: bool = True


class RunConfig(Protocol):
    """What :func:`build_trainer` and :func:`start_run` read of a trainer's config (each of the three has it)."""

    output_dir: str | Path
    epochs: int
    stop_epoch: int | None
    batch_size: int
    accumulation_steps: int
    warmup_epochs: float
    min_lr: float
    clip_grad_norm: float | None
    amp: str | None
    compile: bool
    fsdp: bool
    activation_checkpointing: bool
    seed: int
    save_every_steps: int | None
    resume: str | Path | None
    progress_bar: bool
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    # Read when the config has them: optimizer ("adamw"), momentum (0.9), layer_decay and ema_decay (None: off).


def build_trainer(
    model: nn.Module,
    config: RunConfig,
    *,
    dist: DistInfo,
    samples_per_rank: int,
    loss_fn: LossFn,
    stem: str,
    identity: Mapping[str, Any],
    on_batch: Callable[[BatchEvent], None] | None = None,
) -> Trainer:
    """A :class:`Trainer` with the optimizer, schedule, EMA, precision, clipping and step checkpoints ``config``
    asks for.

    The optimizer covers :func:`~birder.training.optim.param_groups` of ``model`` (layer-wise lr decay with
    ``config.layer_decay``); ``config.ema_decay`` keeps an EMA of the weights (``trainer.ema``). The cosine
    schedule is planned for ``config.epochs`` passes over this rank's ``samples_per_rank`` samples. Step
    checkpoints go to ``<output_dir>/<stem>_step_states.pt``, with ``identity`` (what a resume must match).

    ``config.fsdp`` shards ``model`` in place (and its EMA copy) before the optimizer is built over the shards;
    ``config.activation_checkpointing`` recomputes each block's activations in the backward pass.
    """
    if config.activation_checkpointing and config.compile:
        # The compiled graph and the recomputation disagree on what was saved (torch.utils.checkpoint fails).
        raise BirderError("--activation-checkpointing with --compile is not supported: drop one of them")
    dtype = amp_dtype(config.amp, dist.device)
    ema_decay = getattr(config, "ema_decay", None)
    # The EMA copy is taken before the checkpointing hooks are added: it never runs a backward pass.
    if config.fsdp:
        sharding.check_fsdp_run(dist, compile=config.compile)
        ema_module = sharding.shard_model(
            model,
            dist,
            amp_dtype=dtype,
            with_copy=ema_decay is not None,
            activation_checkpointing=config.activation_checkpointing,
        )
        ema = ModelEMA(model, ema_decay, module=ema_module) if ema_decay is not None else None
    else:
        ema = ModelEMA(model, ema_decay) if ema_decay is not None else None
        if config.activation_checkpointing:
            sharding.apply_activation_checkpointing(model)
    groups = param_groups(model, config.lr, config.weight_decay, getattr(config, "layer_decay", None))
    optimizer = build_optimizer(
        getattr(config, "optimizer", "adamw"),
        groups,
        momentum=getattr(config, "momentum", 0.9),
        betas=tuple(config.betas),
    )
    scheduler = epoch_cosine_schedule(
        optimizer,
        epochs=config.epochs,
        batches_per_epoch=math.ceil(samples_per_rank / config.batch_size),
        accumulation_steps=config.accumulation_steps,
        warmup_epochs=config.warmup_epochs,
        min_lr=config.min_lr,
    )
    step_states_path = Path(config.output_dir) / f"{stem}_step_states.pt"

    def save_step_states(trainer: Trainer, progress: EpochProgress) -> None:
        trainer.save_state(step_states_path, progress, epoch_complete=False, extra=identity)

    return Trainer(
        model,
        dist=dist,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=grad_scaler(dist.device, dtype, sharded=config.fsdp),
        loss_fn=loss_fn,
        amp_dtype=dtype,
        accumulation_steps=config.accumulation_steps,
        clip_grad_norm=config.clip_grad_norm,
        ema=ema,
        compile=config.compile,
        fsdp=config.fsdp,
        progress_bar=config.progress_bar,
        save_every_steps=config.save_every_steps,
        step_checkpoint=save_step_states,
        on_batch=on_batch,
    )


def start_run(
    trainer: Trainer,
    config: RunConfig,
    *,
    stem: str,
    identity: Mapping[str, Any],
    metrics: Sequence[MetricsCSV] = (),
) -> tuple[range, EpochProgress | None]:
    """Seed every rank its own way, then resume ``config.resume`` (a state file, or ``latest`` of ``stem`` in the
    output folder) when there is one. Returns the epochs this call trains (up to ``stop_epoch`` or ``epochs``)
    and, for an unfinished epoch, how far it went.

    The main process makes the output folder and drops the rows of ``metrics`` from the epochs about to be redone.
    Call it once everything that draws random numbers while being built exists (see :meth:`Trainer.load_state_dict`).
    """
    # From here on ranks draw different masks, drop-path and mixup samples.
    seed_everything(config.seed, trainer.dist.rank)
    output_dir = Path(config.output_dir)
    resume_path = resolve_resume(config.resume, output_dir, stem)
    (start_epoch, progress) = (1, None)
    if resume_path is not None:
        (start_epoch, progress) = trainer.resume(resume_path, identity)
    elif config.resume is not None:
        # Starting afresh is fine in an empty folder, not beside checkpoints this run would replace or mix with
        refuse_unrelated_checkpoints(output_dir, stem)
        logger.info("nothing to resume in %s: starting from scratch", output_dir)

    if trainer.dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        for table in metrics:
            table.truncate_after(start_epoch - 1)
    last_epoch = min(config.epochs, config.stop_epoch or config.epochs)
    if start_epoch > last_epoch:
        logger.info("nothing to do: epoch %d of %d is already done", start_epoch - 1, config.epochs)
    return (range(start_epoch, last_epoch + 1), progress)
