"""Overlay PNGs for ``birder-predict --explain DIR``: one per photo, its top species written on it."""

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from birder.inference.tables import feature_file_name
from birder.introspection.explain import explain
from birder.introspection.overlay import save_overlay
from birder.io.images import load_image


def overlay_file_name(path: str) -> str:
    """A unique, stable PNG name for a photo's overlay: its stem and a hash of its full path."""
    return str(Path(feature_file_name(path)).with_suffix(".png"))


def write_overlays(
    net: torch.nn.Module,
    transform: Callable[[Image.Image], torch.Tensor],
    paths: Sequence[str],
    labels: Sequence[str],
    directory: Path,
    method: str = "rollout",
) -> list[Path]:
    """Explain each photo (its top class) and write its overlay, labelled ``labels[i]``, into ``directory``."""
    written = []
    for path, label in zip(paths, labels, strict=True):
        photo = load_image(path)
        result = explain(net, photo, transform, method=method)
        written.append(save_overlay(directory / overlay_file_name(path), photo, result.photo_map, label))
    return written
