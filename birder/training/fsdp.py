"""Fully-sharded data parallel training (``--fsdp``, FSDP2's ``fully_shard``) and activation checkpointing.

Under DDP every rank holds the whole model, its gradients and the optimizer's state. Under FSDP each of the N
ranks keeps 1/N of every parameter, gradient and AdamW moment, and gathers a block's full weights only while
that block runs. The units are the ViT blocks (the encoder's, and the MAE decoder's), each gathered on its own,
then the root module, which owns what is left (patch stem, position embedding, tokens, norms, head).

Files: model files (``<stem>_<epoch>.pt``, the MIM encoder and whole model) are written full, in the usual layout,
gathered to rank 0 one tensor at a time onto the CPU, so ``birder.load_model`` reads them as any other. Training
states stay sharded: each rank writes its own part of the weights, optimizer state and EMA into a
``torch.distributed.checkpoint`` (DCP) folder beside the ``*_states.pt`` file, which keeps the small things
(counters, schedule, random-generator states, progress) and names the folder.
"""

import contextlib
import copy
import itertools
import logging
import secrets
import shutil
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from birder.distributed import DistInfo, all_reduce_sum, broadcast_object
from birder.errors import BirderError, CheckpointError, one_line
from birder.io.atomic import fsync_directory
from birder.net.base import FSDPUnit

logger = logging.getLogger(__name__)

SHARDS_SUFFIX = ".dcp"

# FSDP2 warns whenever a unit returns a view (MAE's prediction is ``x[:, 1:]``), in case a caller changes it in
# place; nothing here does. The sharded gradient scaler's one-element found-inf tensor draws a DTensor warning.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
warnings.filterwarnings("ignore", message=r"Found a non-scalar tensor with numel=1 and ndim!=0")


def _fsdp2() -> ModuleType | None:
    """``torch.distributed.fsdp`` when it has FSDP2 (public from PyTorch 2.6 on), else None. Imported on first use
    (about a quarter of a second), not by every command that imports the training code."""
    try:
        import torch.distributed.fsdp as fsdp
    except ImportError:  # a PyTorch built without distributed support
        return None
    return fsdp if hasattr(fsdp, "fully_shard") else None


def check_fsdp_run(dist: DistInfo, *, compile: bool) -> None:
    """Refuse, in one line, what ``--fsdp`` cannot do here."""
    if _fsdp2() is None:
        raise BirderError(f"--fsdp needs PyTorch 2.6 or later (this is {torch.__version__}): upgrade, or drop --fsdp")
    if compile:
        raise BirderError("--fsdp with --compile is not supported: drop --compile (or --fsdp)")
    if not dist.distributed:
        raise BirderError(
            "--fsdp shards the model over the processes of a torchrun job: launch with torchrun --nproc_per_node N "
            "(N >= 2), or drop --fsdp"
        )


def blocks(model: nn.Module) -> list[nn.Module]:
    """The modules that become units of their own (and are checkpointed with --activation-checkpointing): those
    the networks name as such (:class:`~birder.net.base.FSDPUnit`)."""
    return [module for module in model.modules() if isinstance(module, FSDPUnit)]


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each block's activations in the backward pass instead of keeping them (with or without FSDP).

    The composable form registers hooks and leaves the module tree alone, so parameter names, and with them the
    checkpoints, stay as they are (``checkpoint_wrapper`` would add a prefix to every block key). Random draws
    (drop path, dropout) are replayed identically. Returns the number of blocks.
    """
    from torch.distributed._composable import checkpoint

    found = blocks(model)
    for block in found:
        checkpoint(block)
    logger.info("activation checkpointing: %d blocks", len(found))
    return len(found)


def is_sharded(model: nn.Module) -> bool:
    # Nothing can be sharded before FSDP was imported: no import here for the many callers that never shard.
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, getattr(fsdp, "FSDPModule", ()))


def _shard(model: nn.Module, dist: DistInfo, amp_dtype: torch.dtype | None) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    # bf16: blocks gather and compute in bf16, gradients are reduced (and the sharded weights kept) in float32.
    # fp16 keeps float32 weights under autocast, with the sharded gradient scaler (amp.grad_scaler).
    if amp_dtype == torch.bfloat16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for block in blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device: its structure, no memory."""
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def shard_model(
    model: nn.Module,
    dist: DistInfo,
    *,
    amp_dtype: torch.dtype | None,
    with_copy: bool = False,
    activation_checkpointing: bool = False,
) -> nn.Module | None:
    """Shard ``model`` in place (each block a unit, then the root), its blocks checkpointed first when asked.

    With ``with_copy``, also return a sharded copy of its weights (the EMA), made without a second full copy of the
    model ever existing on a rank: the copy is built on the meta device, sharded, then given the model's shards.
    """
    duplicate = _meta_copy(model) if with_copy else None
    if activation_checkpointing:  # checkpointing inside each unit, as FSDP expects it
        apply_activation_checkpointing(model)
    _shard(model, dist, amp_dtype)
    if duplicate is None:
        return None

    _shard(duplicate, dist, amp_dtype)
    duplicate.to_empty(device=dist.device)
    pairs = zip(
        itertools.chain(duplicate.named_parameters(), duplicate.named_buffers()),
        itertools.chain(model.named_parameters(), model.named_buffers()),
        strict=True,
    )
    with torch.no_grad():
        for (_, target), (_, source) in pairs:
            target.copy_(source)
    return duplicate


def full_state_dict(model: nn.Module, dist: DistInfo) -> dict[str, torch.Tensor] | None:
    """The whole state dict of ``model`` on rank 0 (None elsewhere), keys as the plain module's.

    Sharded: gathered one tensor at a time onto rank 0's CPU (a collective call: every rank must make it), so no
    rank ever holds more than the one full copy it is writing. Plain: the module's own tensors, not copied.
    """
    if not is_sharded(model):
        return model.state_dict() if dist.is_main else None

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if dist.is_main else None


# Training states: a DCP folder per state file


def training_parts(model: nn.Module, optimizer: torch.optim.Optimizer, ema: nn.Module | None) -> dict[str, Any]:
    """What a state's DCP folder holds: the weights, the optimizer state and the EMA weights, by parameter name.

    For a sharded model each rank's part; for a plain one the whole tensors, so a plain run (DDP, one process)
    reads a sharded run's folder too: DCP gathers what each tensor needs from the shards.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    (model_state, optimizer_state) = get_state_dict(model, optimizer)
    parts = {"model": model_state, "optimizer": optimizer_state}
    if ema is not None:
        parts["ema"] = get_model_state_dict(ema)
    return parts


def restore_parts(
    model: nn.Module, optimizer: torch.optim.Optimizer, ema: nn.Module | None, parts: Mapping[str, Any]
) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=parts["model"], optim_state_dict=parts["optimizer"])
    if ema is not None:
        set_model_state_dict(ema, parts["ema"])


def save_shards(states_path: Path, parts: Mapping[str, Any], dist: DistInfo) -> str:
    """Write ``parts`` as a DCP folder beside ``states_path``; returns its name (a collective call).

    The folder is written under a temporary name and renamed once complete; its name is new every time
    (``<states>.<random>.dcp``), so the state file that names the previous one stays valid until it is itself
    replaced (then :func:`remove_stale_shards`).
    """
    import torch.distributed.checkpoint as dcp

    # secrets, not random: the training random streams must not notice a checkpoint.
    token = broadcast_object(secrets.token_hex(4) if dist.is_main else None, dist)
    name = f"{states_path.name.removesuffix('.pt')}.{token}{SHARDS_SUFFIX}"
    partial = states_path.parent / f"{name}.tmp"
    with _quiet_dcp():
        dcp.save(dict(parts), checkpoint_id=partial)
    if dist.is_main:  # dcp.save returns on rank 0 once every rank's file and the index are written
        partial.rename(states_path.parent / name)
        fsync_directory(states_path.parent)
    return name


def remove_stale_shards(states_path: Path, keep: str) -> None:
    """Remove the DCP folders of earlier saves of ``states_path`` (and unfinished ones), once it names ``keep``."""
    prefix = states_path.name.removesuffix(".pt")
    for folder in states_path.parent.glob(f"{prefix}.*{SHARDS_SUFFIX}*"):
        if folder.name != keep and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


def load_shards(folder: Path, parts: dict[str, Any]) -> None:
    """Fill ``parts`` (from :func:`training_parts`) in place from a DCP folder, whatever its number of shards."""
    import torch.distributed.checkpoint as dcp

    if not (folder / ".metadata").is_file():
        raise CheckpointError(f"{folder}: missing or incomplete sharded training state (no .metadata)")
    try:
        with _quiet_dcp():
            dcp.load(parts, checkpoint_id=folder)
    except Exception as err:  # DCP raises many types (CheckpointException wraps each rank's); one line for the user
        raise CheckpointError(f"{folder}: cannot read the sharded training state ({one_line(err)})") from None


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    # In one process DCP says it assumes a single-process load: that is the intent here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch.distributed is disabled, unavailable or uninitialized")
        yield


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> dict:
    """A plain ``optimizer.state_dict()`` (parameters by index) keyed by parameter name instead, the form
    ``set_state_dict`` shards; ``optimizer`` is the current one, built over the same groups in the same order."""
    names = {id(param): name for (name, param) in model.named_parameters()}
    groups = optimizer.param_groups
    saved_groups = saved["param_groups"]
    sizes = ([len(g["params"]) for g in groups], [len(g["params"]) for g in saved_groups])
    if sizes[0] != sizes[1]:
        raise CheckpointError(f"the saved optimizer has parameter groups of sizes {sizes[1]}, this run {sizes[0]}")

    index_to_name = {
        index: names[id(param)]
        for (group, saved_group) in zip(groups, saved_groups, strict=True)
        for (index, param) in zip(saved_group["params"], group["params"], strict=True)
    }
    return {
        "state": {index_to_name[index]: value for (index, value) in saved["state"].items()},
        "param_groups": [
            {**group, "params": [index_to_name[index] for index in group["params"]]} for group in saved_groups
        ],
    }


def restore_full_into_sharded(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: nn.Module | None,
    state: Mapping[str, Any],
) -> None:
    """Load a state saved without ``--fsdp`` (whole tensors) into a sharded model: each rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    options = StateDictOptions(full_state_dict=True)
    optimizer_state = optimizer_state_by_name(model, optimizer, state["optimizer"])
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=optimizer_state, options=options)
    if ema is not None and state.get("ema") is not None:
        set_model_state_dict(ema, state["ema"]["module"], options=options)


# Evaluation


def in_lockstep(batches: Iterable[Any], dist: DistInfo) -> Iterator[Any | None]:
    """``batches``, then None until every rank has run out of its own (a collective call per item).

    A sharded model gathers its weights in every forward, with every rank: a rank whose share of a validation set
    is shorter must keep running (dummy) forwards until the longest share is done.
    """
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        left = all_reduce_sum(torch.tensor([int(batch is not None)], device=dist.device), dist)
        if not int(left.item()):
            return
        yield batch


def idle_forward(model: nn.Module, device: torch.device) -> None:
    """One forward of a blank image, output unused: this rank's part of another rank's forward (see in_lockstep)."""
    model(torch.zeros(1, model.input_channels, *model.size, device=device))
