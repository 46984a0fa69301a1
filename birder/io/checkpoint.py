"""Reading and writing model files: ``.pt`` and ``.safetensors`` (docs/compatibility.md, "Checkpoint files").

Only file formats live here; building networks from files is :mod:`birder.loading`. Reads never unpickle code
(``weights_only=True``) and memory-map the tensors, so a 1.2 GB checkpoint is not copied into memory a second
time when it is assigned to a network built on the meta device.
"""

import json
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from birder.errors import CheckpointError, one_line
from birder.io.atomic import atomic_write_path
from birder.io.calibration import CALIBRATION_KEY
from birder.tasks import DEFAULT_TASK
from birder.version import __version__

CHECKPOINT_FORMATS = ("pt", "safetensors")
# Deployment formats, written and read by birder.io.export (imported lazily there: onnx is optional).
EXPORT_FORMATS = ("pts", "pt2", "onnx")
EXPORT_SUFFIXES = tuple(f".{fmt}" for fmt in EXPORT_FORMATS)
# Metadata keys stored as JSON strings in .safetensors (plain values in .pt).
_JSON_METADATA_KEYS = ("class_to_idx", "signature", "rgb_stats", "config")
_REQUIRED_METADATA_KEYS = ("signature", "class_to_idx", "rgb_stats")


class ModelInfo(NamedTuple):
    """What a checkpoint says about its model (the card's ``model_info``)."""

    class_to_idx: dict[str, int]
    signature: dict[str, Any]
    rgb_stats: dict[str, Any]
    custom_config: dict[str, Any] | None = None


def checkpoint_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in CHECKPOINT_FORMATS:
        raise CheckpointError(
            f"{path}: unsupported model file extension '.{suffix}' (expected one of: "
            + ", ".join(f".{fmt}" for fmt in CHECKPOINT_FORMATS)
            + ")"
        )

    return suffix


def is_export_file(path: str | Path) -> bool:
    """Whether ``path`` names an export (TorchScript, torch.export, ONNX) rather than a checkpoint."""
    return Path(path).suffix.lower() in EXPORT_SUFFIXES


def require_model_file(path: Path, remedy: str) -> None:
    """A clear one-line error for a model file that is missing or empty (an interrupted copy), before any reader."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes); {remedy}")


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a model file into ``(state_dict, metadata)``; tensors are memory-mapped, on the CPU."""
    path = Path(path)
    file_format = checkpoint_format(path)
    require_model_file(path, "delete it and download or copy it again")

    if file_format == "safetensors":
        (state, metadata) = _read_safetensors(path)
    else:
        (state, metadata) = _read_pt(path)

    missing = [key for key in _REQUIRED_METADATA_KEYS if key not in metadata]
    if missing:
        raise CheckpointError(f"{path}: not a birder model file (no {', '.join(missing)} metadata)")

    return (state, metadata)


def _read_pt(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise CheckpointError(
                f"{path}: refusing to load: the file contains pickled Python objects, not just tensors and "
                "plain values (re-save it with birder.save_model)"
            ) from None
        raise CheckpointError(f"{path}: truncated or not a PyTorch checkpoint ({one_line(err)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CheckpointError(f"{path}: truncated or not a PyTorch checkpoint ({one_line(err)})") from None

    if not isinstance(content, Mapping) or "state" not in content:
        raise CheckpointError(f"{path}: not a birder checkpoint (expected a dict with a 'state' entry)")

    state = content["state"]
    metadata = {key: value for key, value in content.items() if key != "state"}
    return (dict(state), metadata)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            raw_metadata = handle.metadata() or {}
            # Cloned: the tensors read sit at the header's 8-byte offsets, and the CPU kernels round differently on
            # unaligned weights (logits 1e-7 off those of the same weights from a .pt); clones are 64-byte aligned
            state = {key: handle.get_tensor(key).clone() for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({err})") from None

    return (state, metadata_from_strings(path, raw_metadata))


def write_checkpoint(path: str | Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> Path:
    """Write ``state`` and ``metadata`` atomically; the format follows the extension."""
    path = Path(path)
    file_format = checkpoint_format(path)
    # Tensors stay where they are when already contiguous on the CPU: no second copy of the weights.
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
    with atomic_write_path(path) as tmp_path:
        if file_format == "safetensors":
            save_file(tensors, str(tmp_path), metadata=metadata_to_strings(metadata))
        else:
            torch.save({"state": tensors, **metadata}, tmp_path)

    return path


def build_metadata(net: Any, model_info: ModelInfo, *, task: str | None = None) -> dict[str, Any]:
    """The checkpoint metadata of ``net`` (plain values), plus the network name and its config override.

    Every writer (``.pt``, ``.safetensors``, exports, MIM training) stores exactly this, so a file always knows how
    to rebuild its network; Birder ignores the extra keys. ``task`` defaults to the network's own (a loaded model
    keeps the task its file recorded), and a calibrated network (``net.calibration``) keeps its calibration
    (:mod:`birder.io.calibration`).
    """
    task = str(task or getattr(net, "task", None) or DEFAULT_TASK)
    # The network is the truth about its shapes: a model resized after loading must not be saved with its old size.
    if all(hasattr(net, attr) for attr in ("input_channels", "size", "num_classes")):
        signature = make_signature(net.input_channels, net.size, net.num_classes)
    else:
        signature = model_info.signature

    metadata: dict[str, Any] = {
        "birder_version": f"v{__version__}",
        "task": task,
        "signature": signature,
        "class_to_idx": dict(model_info.class_to_idx),
        "rgb_stats": {key: list(value) for key, value in model_info.rgb_stats.items()},
    }
    config = getattr(net, "config_override", None) or model_info.custom_config
    if config:
        metadata["config"] = dict(config)
    network = getattr(net, "network_name", None)
    if network is not None:
        metadata["network"] = network
    calibration = getattr(net, "calibration", None)
    if calibration is not None:
        metadata[CALIBRATION_KEY] = calibration.to_metadata_value()  # a JSON string in every format

    return metadata


def metadata_to_strings(metadata: Mapping[str, Any]) -> dict[str, str]:
    """Metadata as the string map of safetensors headers and export extra files (structured values as JSON)."""
    return {
        key: json.dumps(value) if key in _JSON_METADATA_KEYS else str(value)
        for key, value in metadata.items()
        if value is not None
    }


def metadata_from_strings(path: str | Path, raw: Mapping[str, str | bytes]) -> dict[str, Any]:
    """The inverse of :func:`metadata_to_strings`; empty values (a key an export loader did not find) are left out."""
    metadata: dict[str, Any] = {}
    for key, raw_value in raw.items():
        value = raw_value.decode("utf-8") if isinstance(raw_value, bytes) else raw_value
        if value == "":
            continue
        if key in _JSON_METADATA_KEYS:
            try:
                metadata[key] = json.loads(value)
            except json.JSONDecodeError:
                raise CheckpointError(f"{path}: metadata '{key}' is not valid JSON") from None
        else:
            metadata[key] = value

    return metadata


def model_info_from_metadata(metadata: Mapping[str, Any]) -> ModelInfo:
    return ModelInfo(
        class_to_idx=dict(metadata["class_to_idx"]),
        signature=metadata["signature"],
        rgb_stats=metadata["rgb_stats"],
        custom_config=metadata.get("config"),
    )


def make_signature(input_channels: int, size: tuple[int, int], num_classes: int) -> dict[str, Any]:
    return {
        "inputs": [{"data_shape": [0, input_channels, int(size[0]), int(size[1])]}],
        "outputs": [{"data_shape": [0, num_classes]}],
    }


def names_by_index(class_to_idx: Mapping[str, int]) -> list[str]:
    """The class names in the order of the model's outputs (``class_to_idx`` sorted by index): the one helper
    every loader, command and table uses."""
    return sorted(class_to_idx, key=class_to_idx.__getitem__)


def get_size_from_signature(signature: Mapping[str, Any]) -> tuple[int, int]:
    """Input ``(height, width)`` of a model signature."""
    return tuple(signature["inputs"][0]["data_shape"][2:4])  # type: ignore[return-value]


def get_channels_from_signature(signature: Mapping[str, Any]) -> int:
    return int(signature["inputs"][0]["data_shape"][1])


def get_num_classes_from_signature(signature: Mapping[str, Any]) -> int:
    return int(signature["outputs"][0]["data_shape"][1])
