"""Models from files and from names: the one checkpoint path every loader (API, CLI, server) goes through.

Networks are built on the meta device (no memory, no random init) and receive the memory-mapped checkpoint
tensors with ``load_state_dict(assign=True)``, so loading a 1.2 GB file costs about 1.2 GB, not twice that.
"""

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import birder.net  # noqa: F401 (registers the network families)
from birder.data.transforms import model_transform
from birder.errors import BirderError, CheckpointError
from birder.io.calibration import calibration_from_metadata
from birder.io.checkpoint import (
    DEFAULT_TASK,
    ModelInfo,
    build_metadata,
    get_channels_from_signature,
    get_num_classes_from_signature,
    get_size_from_signature,
    is_export_file,
    make_signature,
    model_info_from_metadata,
    read_checkpoint,
    write_checkpoint,
)
from birder.io.download import fetch_pretrained_file
from birder.model_registry import registry
from birder.net.base import BaseNet
from birder.tasks import Task

logger = logging.getLogger(__name__)

# How many names of each kind a "does not fit" error lists before it summarises.
_MAX_KEYS_IN_ERROR = 5


def save_model(
    net: BaseNet,
    path: str | Path,
    model_info: ModelInfo,
    *,
    task: str | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``net`` with its metadata to ``path`` (``.pt`` or ``.safetensors``, by extension), atomically.

    ``state``: the weights to write instead of ``net.state_dict()``, in its layout (a sharded model's, gathered
    whole: :func:`birder.training.fsdp.full_state_dict`); not for exports.

    ``.pts`` (TorchScript), ``.pt2`` (torch.export) and ``.onnx`` write an export for deployment instead
    (:mod:`birder.io.export`). The file carries the network name and the config override the network was built with, so
    :func:`load_model` can rebuild it without being told; Birder ignores those extra keys. ``task`` defaults to the
    network's (``net.task``).
    """
    if is_export_file(path):
        if state is not None:
            raise BirderError(f"{path}: an export traces the network itself; it cannot take separate weights")
        from birder.io.export import export_model

        return export_model(net, path, model_info, task=task)

    metadata = build_metadata(net, model_info, task=task)
    return write_checkpoint(path, net.state_dict() if state is None else state, metadata)


def _describe_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> list[str]:
    def listing(keys: list[str]) -> str:
        shown = ", ".join(keys[:_MAX_KEYS_IN_ERROR])
        more = f" and {len(keys) - _MAX_KEYS_IN_ERROR} more" if len(keys) > _MAX_KEYS_IN_ERROR else ""
        return f"{shown}{more}"

    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    mismatched = [
        f"{key} (file {tuple(found[key].shape)}, network {tuple(expected[key].shape)})"
        for key in expected
        if key in found and found[key].shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {listing(mismatched)}")

    return problems


def load_state_into(net: BaseNet, state: dict[str, torch.Tensor], source: str) -> None:
    """Assign ``state`` to ``net`` (legacy layouts renamed first), or raise naming every mismatch."""
    state = net.upgrade_state_dict(state)
    problems = _describe_mismatch(net.state_dict(), state)
    if problems:
        raise CheckpointError(
            f"{source} does not fit network '{net.network_name}': {'; '.join(problems)} "
            "(a checkpoint of another network or config? pass the right network / custom_config)"
        )

    net.load_state_dict(state, strict=True, assign=True)


def _finalize(
    net: BaseNet, *, inference: bool, device: torch.device | str | None, dtype: torch.dtype | None
) -> BaseNet:
    if device is not None or dtype is not None:
        net = net.to(device=device, dtype=dtype)

    if inference:
        net.eval()
        net.requires_grad_(False)

    return net


def load_model(
    path: str | Path,
    *,
    network: str | None = None,
    custom_config: Mapping[str, Any] | None = None,
    inference: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    new_size: tuple[int, int] | None = None,
) -> tuple[BaseNet, ModelInfo]:
    """Load a local model file (``.pt`` or ``.safetensors``) into its network.

    ``network`` is needed when the file does not name it (files written by Birder itself). ``custom_config``
    updates the config stored in the file (Birder 0.2 did not store it). ``new_size`` resizes the position
    embedding after loading (e.g. a 224 px MIM encoder used at 256 px).
    """
    if is_export_file(path):
        # TorchScript, torch.export and ONNX files; imported here so `import birder` never loads onnxruntime.
        from birder.io.export import load_exported

        if custom_config is not None or new_size is not None or dtype is not None:
            raise CheckpointError(
                f"{path}: an export is fixed at its input size, config and dtype; custom_config, new_size and "
                "dtype apply to .pt and .safetensors files (export again from a converted network)"
            )
        return load_exported(path, device=device)  # always ready for inference; `network` is not needed

    (state, metadata) = read_checkpoint(path)
    if metadata.get("task") == "masked_image_modeling" and "encoder" in metadata:
        raise CheckpointError(
            f"{path}: a whole MIM model (encoder + decoder); load the encoder file <network>_mim_<epoch>.pt, "
            "or use birder.training.mim.load_mim_model"
        )

    if metadata.get("task") == Task.OBJECT_DETECTION.value:
        raise CheckpointError(
            f"{path}: a detector file (birder-train-det); load it with birder.net.detection.checkpoint.load_detector "
            "(on the command line: --detector FILE, beside a classifier given with -n/--weights)"
        )

    network = network or metadata.get("network")
    if network is None:
        raise CheckpointError(f"{path}: the file does not name its network; pass network=... (e.g. 'vit_l16')")

    config = {**(metadata.get("config") or {}), **(custom_config or {})} or None
    signature = metadata["signature"]
    with torch.device("meta"):
        net = registry.net_factory(
            network,
            get_num_classes_from_signature(signature),
            get_channels_from_signature(signature),
            config=config,
            size=get_size_from_signature(signature),
        )

    load_state_into(net, state, str(path))
    del state
    net.task = str(metadata.get("task") or DEFAULT_TASK)  # a MIM encoder saved again stays one
    # birder-calibrate's temperature, thresholds and unknown test travel with the network (None: uncalibrated)
    net.calibration = calibration_from_metadata(metadata, path, net.state_dict())
    if new_size is not None:
        net.adjust_size(new_size)

    net = _finalize(net, inference=inference, device=device, dtype=dtype)
    info = model_info_from_metadata(metadata)
    if config is not None and info.custom_config != config:
        info = info._replace(custom_config=config)
    if new_size is not None:
        info = info._replace(signature=make_signature(net.input_channels, net.size, net.num_classes))

    return (net, info)


def load_pretrained_model(
    name: str,
    *,
    dst: str | Path | None = None,
    file_format: str = "pt",
    inference: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    custom_config: Mapping[str, Any] | None = None,
    progress_bar: bool = True,
) -> tuple[BaseNet, ModelInfo]:
    """Load a pretrained model by name, downloading (and verifying) it on first use."""
    metadata = registry.get_pretrained_metadata(name)
    path = fetch_pretrained_file(
        name, metadata, file_format, dst=Path(dst) if dst is not None else None, progress_bar=progress_bar
    )
    return load_model(
        path,
        network=metadata["net"]["network"],
        custom_config=custom_config,
        inference=inference,
        device=device,
        dtype=dtype,
    )


def load_named_or_file_model(
    name: str | None = None,
    weights: str | Path | None = None,
    network: str | None = None,
    *,
    inference: bool = True,
    device: torch.device | str | None = None,
    progress_bar: bool = True,
) -> tuple[BaseNet, ModelInfo]:
    """The model a command names, the one way every command takes it: ``-n NAME`` or ``--weights FILE``.

    ``name`` is a pretrained name (downloaded on first use) unless ``weights`` names a local file (a checkpoint or
    an export); then ``name`` may instead give the network (a network name, or a pretrained name whose manifest
    entry names it), as may ``network``, for files that do not name their network.
    """
    if weights is not None:
        if network is None and name is not None:
            if registry.exists(name):
                network = name
            elif registry.pretrained_exists(name):
                network = registry.get_pretrained_metadata(name)["net"]["network"]
            else:
                registry.network_config(name)  # raises UnknownModelError, with close names

        return load_model(weights, network=network, inference=inference, device=device)

    if name is None:
        raise BirderError("no model given: pass a pretrained name (-n vit_l16_mim-eu-common) or --weights FILE")
    if not registry.pretrained_exists(name) and registry.exists(name):
        raise BirderError(f"'{name}' is a network, not a pretrained model: pass its weights with --weights FILE")

    return load_pretrained_model(name, inference=inference, device=device, progress_bar=progress_bar)


def load_pretrained_model_and_transform(
    name: str,
    *,
    center_crop: float = 1.0,
    simple_crop: bool = False,
    **kwargs: Any,
) -> tuple[BaseNet, ModelInfo, Callable[[Image.Image], torch.Tensor]]:
    """:func:`load_pretrained_model` plus the model's inference transform."""
    (net, model_info) = load_pretrained_model(name, **kwargs)
    return (net, model_info, model_transform(model_info, center_crop=center_crop, simple_crop=simple_crop))
