"""Pictures: MAE reconstruction grids and confusion matrices (training), photos with their top species (prediction).

The reconstruction grids need only PIL. matplotlib is an optional extra (``birder[plot]``), imported by the
functions that need it, never at import time: ``import birder`` must work without it.
"""

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torchvision.utils import make_grid

from birder.errors import BirderError, ImageDecodeError
from birder.io.atomic import atomic_write_path
from birder.io.images import load_image

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from birder.inference.calibration import ReliabilityBins

logger = logging.getLogger(__name__)

# Above this many classes the axes are not labelled (the names would overlap into a black band).
_MAX_LABELLED_CLASSES = 60
_MAX_ANNOTATED_CLASSES = 20


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def denormalize(images: torch.Tensor, rgb_stats: Mapping[str, Sequence[float]]) -> torch.Tensor:
    """Normalized ``[B, 3, H, W]`` -> pixel values in [0, 1]."""
    mean = torch.tensor(rgb_stats["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(rgb_stats["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float().cpu() * std + mean).clamp(0.0, 1.0)


def save_image_rows(rows: Sequence[torch.Tensor], rgb_stats: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    """One row per tensor (e.g. original / masked / reconstructed), each ``[B, 3, H, W]`` normalized."""
    images = torch.cat([denormalize(row, rgb_stats) for row in rows])
    grid = make_grid(images, nrow=rows[0].shape[0], padding=2, pad_value=1.0)
    array = grid.mul(255).round().byte().permute(1, 2, 0).numpy()
    path = Path(path)
    with atomic_write_path(path) as tmp_path:
        Image.fromarray(array).save(tmp_path, format="PNG")

    return path


def save_confusion_matrix_png(confusion: torch.Tensor, class_names: Sequence[str], path: str | Path) -> Path | None:
    """A row-normalized confusion matrix (true classes down, predictions across); None without matplotlib.

    A side output of an evaluation: without matplotlib it is skipped with a warning, not an error.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("no confusion-matrix PNG: matplotlib is not installed (pip install 'birder[plot]')")
        return None

    counts = confusion.double()
    rates = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    num_classes = len(class_names)
    side = min(40.0, max(5.0, 0.3 * num_classes + 3))
    figure = Figure(figsize=(side, side))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    shown = axes.imshow(rates.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true class")
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    if num_classes <= _MAX_LABELLED_CLASSES:
        axes.set_xticks(range(num_classes), class_names, rotation=90)
        axes.set_yticks(range(num_classes), class_names)
    if num_classes <= _MAX_ANNOTATED_CLASSES:
        for true in range(num_classes):
            for pred in range(num_classes):
                colour = "white" if rates[true, pred] > 0.5 else "black"
                axes.text(pred, true, int(counts[true, pred]), ha="center", va="center", color=colour, fontsize=8)

    figure.tight_layout()
    path = Path(path)
    with atomic_write_path(path) as tmp_path:
        figure.savefig(tmp_path, format="png", dpi=100)

    return path


# ---------------------------------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------------------------------


def plot_predictions(
    predictions: Sequence[tuple[str, str, Sequence[tuple[str, float]]]],
    output: str | os.PathLike | None = None,
    show: bool = False,
) -> None:
    """One row per photo: the photo, and a bar chart of its top-k species (``(path, prediction, top)`` items).

    Writes the figure to ``output`` (any format matplotlib knows, by extension) and/or shows it on screen. Asked
    for explicitly (``--plot``, ``--show``), so without matplotlib this raises :class:`BirderError`.
    """
    try:
        import matplotlib
    except ImportError:
        raise BirderError("--show / --plot need matplotlib: pip install 'birder[plot]'") from None

    if not show:
        matplotlib.use("Agg")  # no display needed to write a file (servers, CI)
    import matplotlib.pyplot as plt

    count = max(1, len(predictions))
    (figure, axes) = plt.subplots(count, 2, figsize=(10, 2.6 * count), squeeze=False)
    for row_axes, (path, prediction, top) in zip(axes, predictions, strict=False):
        (photo_axis, bar_axis) = row_axes
        try:
            photo_axis.imshow(load_image(path))
        except ImageDecodeError:
            photo_axis.text(0.5, 0.5, "(unreadable)", ha="center", va="center")
        photo_axis.set_title(f"{Path(path).parent.name}/{Path(path).name}: {prediction}", fontsize=9)
        photo_axis.axis("off")

        names = [name for (name, _) in top][::-1]  # most probable at the top
        values = [prob for (_, prob) in top][::-1]
        bar_axis.barh(names, values, color="tab:green")
        bar_axis.set_xlim(0, 1)
        bar_axis.set_xlabel("probability")
        bar_axis.tick_params(axis="y", labelsize=8)

    figure.tight_layout()
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write_path(output) as tmp:
            figure.savefig(tmp, format=output.suffix.lstrip(".").lower() or "png", dpi=100)
    if show:
        plt.show()
    plt.close(figure)


# ---------------------------------------------------------------------------------------------------------------------
# Calibration and taxonomic fallback (birder-eval)
# ---------------------------------------------------------------------------------------------------------------------


def _agg_figure(size: tuple[float, float], what: str) -> "Figure | None":
    """A matplotlib figure drawn off-screen, or None (with a warning) without matplotlib: these PNGs are side
    outputs of an evaluation, like the confusion matrix."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("no %s PNG: matplotlib is not installed (pip install 'birder[plot]')", what)
        return None

    figure = Figure(figsize=size)
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure: "Figure", path: str | Path) -> Path:
    figure.tight_layout()
    path = Path(path)
    with atomic_write_path(path) as tmp_path:
        figure.savefig(tmp_path, format="png", dpi=100)
    return path


def save_reliability_diagram_png(curves: Mapping[str, "ReliabilityBins"], path: str | Path) -> Path | None:
    """Accuracy against mean confidence per confidence bin, one curve per set of probabilities (``name ->``
    :class:`~birder.inference.calibration.ReliabilityBins`), with the diagonal of perfect calibration and the
    share of photos per bin below; None without matplotlib."""
    figure = _agg_figure((6.0, 7.0), "reliability diagram")
    if figure is None:
        return None

    (top, bottom) = figure.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    for name, bins in curves.items():
        edges = bins.edges
        width = (edges[1] - edges[0]) / (len(curves) + 1)
        filled = bins.counts > 0
        top.plot(bins.confidence[filled], bins.accuracy[filled], marker="o", label=name)
        offset = width * (list(curves).index(name) + 0.5)
        share = bins.counts / max(1, bins.counts.sum())
        bottom.bar(edges[:-1] + offset, share, width=width, align="edge", label=name)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left")
    bottom.set_xlabel("confidence (top probability)")
    bottom.set_ylabel("share of photos")
    return _save_png(figure, path)


def save_coverage_png(
    thresholds: Sequence[float], precision: Sequence[float], species_share: Sequence[float], path: str | Path
) -> Path | None:
    """The taxonomic fallback against the threshold: precision of the emitted labels and the share of photos
    answered at species level; None without matplotlib."""
    figure = _agg_figure((6.0, 4.0), "taxonomy coverage")
    if figure is None:
        return None

    axes = figure.add_subplot()
    axes.plot(thresholds, precision, marker="o", label="precision of the emitted labels")
    axes.plot(thresholds, species_share, marker="s", label="share answered at species level")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("threshold")
    axes.legend(loc="lower left")
    axes.grid(alpha=0.3)
    return _save_png(figure, path)
