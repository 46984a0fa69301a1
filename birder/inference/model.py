"""One way in: a model loaded for inference, with everything a command needs to run it.

:func:`load_for_inference` takes a model the way every command takes one (a pretrained name, or a file: a
checkpoint or an export; a classifier, or with ``detector=True`` a ``birder-train-det`` file) and returns one
:class:`InferenceModel`: the network, its :class:`~birder.io.checkpoint.ModelInfo`, the class names in output
order, the inference transform (the preprocessing travels with the model, as torchvision's weights carry their
transforms), the device, the dtype it runs in and why (:func:`birder.inference.optimize.choose_dtype`), and
birder-calibrate's calibration (None: uncalibrated).

The weights stay float32 as loaded unless a dtype is asked for: commands that fingerprint the weights (an index,
the server's ``--index`` check) take the fingerprint first and convert with :meth:`InferenceModel.with_dtype`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from birder.data.transforms import model_transform
from birder.distributed import resolve_device
from birder.errors import BirderError
from birder.inference.optimize import DtypeChoice, choose_dtype, optimize_for_inference
from birder.io.calibration import Calibration
from birder.io.checkpoint import ModelInfo, get_size_from_signature, names_by_index
from birder.net.base import BaseNet

AS_LOADED = DtypeChoice("float32", "as loaded")
EXPORT_DTYPE = DtypeChoice("float32", "an export runs in the dtype it was exported in")
ModelKind = Literal["classifier", "detector"]


@dataclass(frozen=True)
class InferenceModel:
    """A model ready for inference and what goes with it (see the module's docstring)."""

    net: nn.Module  # a BaseNet, a detector, or an export (.pts, .pt2, .onnx) that runs as it was exported
    info: ModelInfo
    kind: ModelKind
    class_names: list[str]  # in the order of the model's outputs
    transform: Callable[[Any], torch.Tensor]  # PIL photo -> the network's input
    device: torch.device
    dtype: DtypeChoice
    calibration: Calibration | None
    source: str  # the pretrained name or the file, as given

    @property
    def size(self) -> tuple[int, int]:
        """The input size ``(H, W)`` the model was trained at."""
        return get_size_from_signature(self.info.signature)

    def with_dtype(
        self, requested: str, *, flags: Iterable[str] | None = None, cuda_capability: tuple[int, int] | None = None
    ) -> InferenceModel:
        """This model converted to ``requested`` (``auto`` or a float mode) for its device; ``flags`` and
        ``cuda_capability`` as :func:`~birder.inference.optimize.choose_dtype` takes them. An export keeps its
        dtype; a detector runs in float32 (its box heads are not checked in lower precision)."""
        if self.kind == "detector":
            return self
        (net, choice) = convert_dtype(self.net, requested, self.device, flags=flags, cuda_capability=cuda_capability)
        return dataclasses.replace(self, net=net, dtype=choice)


def convert_dtype(
    net: nn.Module,
    requested: str,
    device: torch.device,
    *,
    flags: Iterable[str] | None = None,
    cuda_capability: tuple[int, int] | None = None,
) -> tuple[nn.Module, DtypeChoice]:
    """``net`` converted to ``requested`` (``auto``: :func:`~birder.inference.optimize.choose_dtype` for
    ``device``, so bfloat16 only where it is native) and the choice.

    A detector converts its backbone and feature pyramid only, in place: its head and torchvision's box operations
    (anchors, proposals, RoIAlign, NMS, box decoding) stay float32, cast at the backbone's boundary. An export (.pts,
    .pt2, .onnx) runs as it was exported, its dtype fixed in the file."""
    from birder.net.detection.base import DetectionBaseNet

    if not isinstance(net, BaseNet | DetectionBaseNet):
        return (net, EXPORT_DTYPE)
    choice = choose_dtype(requested, device, flags=flags, cuda_capability=cuda_capability)
    if isinstance(net, DetectionBaseNet):
        net.convert_backbone(getattr(torch, choice.dtype))
        return (net, choice)
    return (optimize_for_inference(net, choice.dtype), choice)


def load_for_inference(
    name: str | None = None,
    weights: str | os.PathLike | None = None,
    network: str | None = None,
    *,
    detector: bool = False,
    device: str | torch.device | None = "auto",
    dtype: str | None = None,
    progress_bar: bool = True,
) -> InferenceModel:
    """The model a command names (``-n NAME`` / ``--weights FILE`` / ``--network``; with ``detector``, the
    detector file ``weights``), in eval mode on ``device`` (a name :func:`birder.distributed.resolve_device`
    takes, or a device), converted to ``dtype`` when given (None: float32 as loaded; a detector converts its backbone
    and pyramid only, :func:`convert_dtype`). A bad input raises a one-line
    :class:`~birder.errors.BirderError`."""
    from birder.loading import load_named_or_file_model

    target = device if isinstance(device, torch.device) else resolve_device(device)
    if detector:
        from birder.inference.detection import detection_transform
        from birder.net.detection.checkpoint import load_detector

        if weights is None:
            raise BirderError("a detector is a file: pass it with --detector FILE")
        (det_net, info) = load_detector(weights, inference=True, device=target)
        choice = AS_LOADED if dtype is None else convert_dtype(det_net, dtype, target)[1]
        return InferenceModel(
            det_net,
            info,
            "detector",
            names_by_index(info.class_to_idx),
            detection_transform(det_net.size, info.rgb_stats),
            target,
            choice,
            None,
            str(weights),
        )

    (net, info) = load_named_or_file_model(name, weights, network, device=target, progress_bar=progress_bar)
    loaded = InferenceModel(
        net,
        info,
        "classifier",
        names_by_index(info.class_to_idx),
        model_transform(info),
        target,
        AS_LOADED,
        getattr(net, "calibration", None),
        str(Path(weights)) if weights is not None else str(name),
    )
    return loaded if dtype is None else loaded.with_dtype(dtype)
