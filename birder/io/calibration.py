"""What a calibrated model file carries beyond Birder's keys, and its class-statistics sidecar.

``birder-calibrate`` writes a copy of a model whose state dict is unchanged and whose metadata gains one key,
``calibration``: a JSON string (in ``.pt`` files too, so both formats hold the same text) with the temperature,
the per-species thresholds, the unknown test and how it was chosen. The published Birder ignores extra keys, so
the file still loads there with the same weights. The embedding statistics of the unknown test (class means, shared
precision matrices, a bank of normalised training embeddings) are too large for metadata; they go to a sidecar
``<model stem>.stats.safetensors`` beside the model file, named in the metadata.

A calibration belongs to the weights it was fitted on: it records a digest of the classifier head, and a file
whose head no longer matches (fine-tuned after calibrating) loads without it, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from birder.errors import CheckpointError
from birder.io.atomic import atomic_write_path

logger = logging.getLogger(__name__)

CALIBRATION_KEY = "calibration"
STATS_SUFFIX = ".stats.safetensors"
# State-dict keys whose bytes identify the weights a calibration was fitted on (the classification head).
_HEAD_PREFIX = "classifier."


@dataclass(frozen=True)
class Calibration:
    """A model's calibration: set on a loaded network as ``net.calibration`` (None when the file has none)."""

    temperature: float = 1.0
    # Per-species thresholds on the calibrated top probability; species without one use the global threshold.
    species_thresholds: dict[str, float] = field(default_factory=dict)
    target_precision: float | None = None
    # The unknown test: the method used by default and a threshold per method (on that method's score).
    unknown_method: str | None = None
    unknown_thresholds: dict[str, float] = field(default_factory=dict)
    keep_known: float | None = None
    stats_file: str | None = None  # the sidecar's file name, beside the model file
    head_digest: str | None = None
    # Why no temperature was fitted (T = 1 kept), e.g. every validation photo predicted right; None when fitted
    temperature_note: str | None = None
    # How the unknown test was chosen on the user's photos (birder.inference.unknown_choice.UnknownChoice.record):
    # the folds, the choice and every candidate's AUROC per fold; None when not chosen
    unknown_selection: dict[str, Any] | None = None
    # Where the sidecar is on this machine: resolved when the model is loaded, never stored.
    stats_path: Path | None = field(default=None, compare=False)

    def to_metadata_value(self) -> str:
        stored = {key: value for (key, value) in asdict(self).items() if key != "stats_path"}
        return json.dumps(stored, sort_keys=True)

    @classmethod
    def from_metadata_value(cls, value: str | Mapping[str, Any], source: str | Path) -> Calibration:
        try:
            fields = json.loads(value) if isinstance(value, str) else dict(value)
            calibration = cls(**fields)
        except (json.JSONDecodeError, TypeError) as err:
            raise CheckpointError(
                f"{source}: metadata '{CALIBRATION_KEY}' is not a birder calibration ({err})"
            ) from None
        temperature = calibration.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature > 0:
            raise CheckpointError(f"{source}: calibration temperature must be a positive number, got {temperature!r}")
        return calibration


def stats_path_for(model_path: str | Path) -> Path:
    """The sidecar of a model file: ``calibrated.pt`` -> ``calibrated.stats.safetensors``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + STATS_SUFFIX)


def head_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A sha256 of the classification head's float32 values (the keys under ``classifier.``)."""
    digest = hashlib.sha256()
    for key in sorted(key for key in state if key.startswith(_HEAD_PREFIX)):
        digest.update(key.encode("utf-8"))
        digest.update(state[key].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def calibration_from_metadata(
    metadata: Mapping[str, Any], model_path: str | Path, state: Mapping[str, torch.Tensor] | None = None
) -> Calibration | None:
    """The calibration a model file records, its sidecar resolved beside ``model_path``; None when it has none.

    ``state`` (the loaded weights) is checked against the recorded head digest: a calibration fitted on other
    weights is dropped with a warning rather than applied to numbers it does not describe.
    """
    value = metadata.get(CALIBRATION_KEY)
    if not value:
        return None

    calibration = Calibration.from_metadata_value(value, model_path)
    if state is not None and calibration.head_digest is not None and head_digest(state) != calibration.head_digest:
        logger.warning(
            "%s: its calibration was fitted on other weights (the head changed since); loaded uncalibrated, "
            "run birder-calibrate again",
            model_path,
        )
        return None

    stats_path = Path(model_path).with_name(calibration.stats_file) if calibration.stats_file else None
    return replace(calibration, stats_path=stats_path)


# ---------------------------------------------------------------------------------------------------------------------
# The sidecar
# ---------------------------------------------------------------------------------------------------------------------


def write_stats_file(path: str | Path, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> Path:
    """Write class statistics atomically; ``info`` (JSON-able) goes to the safetensors header."""
    path = Path(path)
    contiguous = {name: tensor.detach().cpu().contiguous() for (name, tensor) in tensors.items()}
    with atomic_write_path(path) as tmp_path:
        save_file(contiguous, str(tmp_path), metadata={"info": json.dumps(dict(info), sort_keys=True)})
    return path


def read_stats_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, info)`` of a sidecar written by :func:`write_stats_file`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: class statistics not found (keep the .stats.safetensors file beside the model, or run "
            "birder-calibrate again with --train)"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            info = json.loads((handle.metadata() or {}).get("info", "{}"))
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: truncated or not a class-statistics file ({err})") from None

    return (tensors, info)
