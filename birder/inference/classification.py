"""Classification inference: the card's ``infer_image`` and ``infer_batch``.

Always runs under ``torch.inference_mode()`` so it works on a network loaded without ``inference=True`` (the
reference fails there: docs/compatibility.md, "Known defects of the reference not copied"), and moves inputs to
the network's device and floating dtype. Probabilities are ``softmax(logits / T)`` with the temperature of a
calibrated model (steps 1-3 of :mod:`birder.inference.decision`); a file without calibration has ``T = 1``.
"""

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from birder.data.transforms import TTA_NUM_CROPS, tta_crops
from birder.inference.decision import calibrated_softmax, model_temperature
from birder.io.images import load_image
from birder.net.base import BaseNet


def _net_device_and_dtype(net: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(net.parameters())
    return (param.device, param.dtype)


def _to_numpy(tensor: torch.Tensor) -> npt.NDArray[np.float32]:
    return tensor.float().cpu().numpy()


def infer_batch(
    net: BaseNet,
    inputs: torch.Tensor,
    return_embedding: bool = False,
    tta: bool = False,
    return_logits: bool = False,
    calibrated: bool = True,
    prior: Any = None,
    location: Any = None,
    date: Any = None,
    prior_strength: float = 1.0,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
    """Classify a batch of transformed images ``[B, C, H, W]``.

    Returns ``(probabilities [B, classes], embedding [B, D] or None)`` as float32 numpy arrays; logits instead
    of probabilities with ``return_logits`` (raw: never divided by the temperature). With ``tta`` the softmax of
    five 0.8-side crops is averaged (logits and embeddings are averaged too). ``calibrated=False`` ignores the
    model's temperature.

    ``prior`` (a :class:`~birder.geo.prior.LocationPrior` for the model's classes, or a ``.bpr`` path) adjusts the
    probabilities for where (``location``: ``(latitude, longitude)``) and when (``date``: a date, datetime or ISO
    text) the photos were taken, one value for all or one per image: ``p × prior ** prior_strength``,
    renormalised. Without a location a photo keeps its image-only probabilities; without a date the prior is
    year-round.
    """
    (device, dtype) = _net_device_and_dtype(net)
    with torch.inference_mode():
        inputs = inputs.to(device=device, dtype=dtype, non_blocking=True)
        batch_size = inputs.shape[0]
        if tta:
            inputs = tta_crops(inputs)  # [B * 5, C, H, W], the 5 views of each image together

        embedding = net.embedding(inputs)
        logits = net.classify(embedding)
        output = logits if return_logits else calibrated_softmax(logits, model_temperature(net, calibrated))
        if tta:
            output = output.reshape(batch_size, TTA_NUM_CROPS, -1).mean(dim=1)
            embedding = embedding.reshape(batch_size, TTA_NUM_CROPS, -1).mean(dim=1)

        probabilities = _to_numpy(output)
        if prior is not None:  # step 4 of the decision order
            probabilities = _with_location_prior(probabilities, prior, location, date, prior_strength, return_logits)
        return (probabilities, _to_numpy(embedding) if return_embedding else None)


def infer_image(
    net: BaseNet,
    image: str | os.PathLike | Image.Image,
    transform: Callable[[Image.Image], torch.Tensor],
    return_embedding: bool = False,
    tta: bool = False,
    return_logits: bool = False,
    device: torch.device | str | None = None,
    calibrated: bool = True,
    prior: Any = None,
    location: tuple[float, float] | None = None,
    date: Any = None,
    prior_strength: float = 1.0,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
    """Classify one photo (a path or a PIL image in any mode); returns arrays with a batch dimension of 1.

    ``device`` moves the network there first (by default it stays where it is). ``calibrated``, ``prior``,
    ``location``, ``date`` and ``prior_strength``: as :func:`infer_batch`.
    """
    if device is not None:
        net.to(device)

    tensor = transform(load_image(image)).unsqueeze(0)
    return infer_batch(
        net,
        tensor,
        return_embedding=return_embedding,
        tta=tta,
        return_logits=return_logits,
        calibrated=calibrated,
        prior=prior,
        location=location,
        date=date,
        prior_strength=prior_strength,
    )


def logits_from_embeddings(net: BaseNet, embeddings: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The raw logits of embeddings ``[B, D]`` (``classify``: a linear head, so the mean of TTA views' embeddings
    gives the mean of their logits): logits without a second forward pass."""
    (device, dtype) = _net_device_and_dtype(net)
    with torch.inference_mode():
        return _to_numpy(net.classify(torch.from_numpy(embeddings).to(device=device, dtype=dtype)))


def _with_location_prior(
    probabilities: npt.NDArray[np.float32],
    prior: Any,
    location: Any,
    date: Any,
    strength: float,
    return_logits: bool,
) -> npt.NDArray[np.float32]:
    """``probabilities`` through the location-and-season prior (:mod:`birder.geo.prior`)."""
    from birder.errors import BirderError
    from birder.geo.prior import prior_rows
    from birder.geo.prior_file import load_prior
    from birder.inference.decision import apply_prior

    if return_logits:
        raise BirderError("a prior adjusts probabilities: it cannot be combined with return_logits")
    if isinstance(prior, str | os.PathLike):
        prior = load_prior(prior)
    if prior.num_classes != probabilities.shape[1]:
        raise BirderError(f"the prior has {prior.num_classes} classes, the model {probabilities.shape[1]}")
    (matrix, _) = prior_rows(prior, len(probabilities), location, date)
    return apply_prior(probabilities, matrix, strength).astype(np.float32)
