"""What a ``birder-predict`` run is told: :class:`PredictionOptions`, made of typed groups.

Each group is what one part of the run reads, with ``birder-predict``'s argument names and defaults:

- :class:`ModelOptions`: the classifier (a pretrained name, or a file and its network) and its preprocessing;
- :class:`ExecutionOptions`: where and how fast (a :class:`~birder.run_options.RunOptions`, the execution options
  every command shares, with predict's own: ``quantize``, ``compile``, ``chunk_size``);
- :class:`OutputOptions`: the tables, the pictures, resuming and overwriting;
- :class:`~birder.inference.decision.DecisionOptions`: how the answer is decided (``label``, ``rank``, ...);
- :class:`DetectionOptions`: crop-then-classify (:mod:`birder.runs.detect`), the boxes from a ``detector`` or a
  ``boxes`` file; None for a run of whole photos;
- :class:`~birder.geo.predict.GeoOptions`: the location-and-season prior, events, camera-trap exports.

``birder-predict`` builds them from its arguments (:func:`birder.scripts.predict.options_from_args`); a library
caller builds the groups it needs, the others keep their defaults.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from birder.geo.predict import GeoOptions
from birder.inference.decision import DecisionOptions
from birder.run_options import RunOptions

# The name the run's messages go by
PROG = "birder-predict"
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
# Exports written from a crop-then-classify run's own tables (birder.runs.detect), not by birder.geo
DETECTION_EXPORTS = ("md-json",)
DECODE_MODES = ("reduced", "full")  # --decode: the first is the default


@dataclass(frozen=True)
class ModelOptions:
    """The classifier: a pretrained ``name``, or a local file (``weights``, and its ``network`` when the file does
    not name it); and how photos are prepared for it."""

    name: str | None = None
    weights: str | os.PathLike | None = None
    network: str | None = None
    size: Sequence[int] | None = None  # H [W]; None: the model's
    center_crop: float = 1.0
    simple_crop: bool = False
    tta: bool = False


@dataclass(frozen=True)
class ExecutionOptions(RunOptions):
    """Where and how fast the run goes: the shared execution options, with predict's defaults and its own."""

    batch_size: int = 32
    num_workers: int = DEFAULT_WORKERS
    dtype: str = "auto"  # auto: bfloat16 where native (CUDA, CPUs with AMX/AVX512-BF16), else float32
    quantize: str | None = None  # int8: dynamic quantization of linear layers (CPU only)
    compile: bool = False
    chunk_size: int = 256  # photos per durable write of the journals


@dataclass(frozen=True)
class OutputOptions:
    """What the run writes, and where."""

    output_dir: Path = Path("results")
    table_format: str = "csv"
    top_k: int = 5
    min_prob: float = 0.0  # below it: "uncertain" (and the answer's global threshold)
    species: str | os.PathLike | None = None  # a file of class names, one per line
    save_probabilities: bool = False
    save_logits: bool = False
    save_embeddings: bool = False
    save_features: bool = False
    resume: bool = False
    overwrite: bool = False  # replace what an earlier run wrote in output_dir (and the other output folders)
    show: bool = False
    plot: str | os.PathLike | None = None
    plot_max: int = 8
    explain: str | os.PathLike | None = None  # a folder: one explanation overlay PNG per photo
    explain_method: str = "rollout"

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_dir", Path(self.output_dir))


@dataclass(frozen=True)
class DetectionOptions:
    """Crop-then-classify (:mod:`birder.runs.detect`): each box the ``detector`` finds, or each animal box of a
    ``boxes`` file (exactly one of the two), is classified, a row per box. A run of whole photos has no such group
    (``PredictionOptions.detection`` is None)."""

    detector: str | os.PathLike | None = None  # a birder-train-det file
    # Or the boxes a user already has (birder.io.box_files: MegaDetector batch output, SpeciesNet, COCO), their
    # relative paths resolved against boxes_root (None: birder.io.box_files.boxes_root decides)
    boxes: str | os.PathLike | None = None
    boxes_root: str | os.PathLike | None = None
    det_threshold: float = 0.5  # boxes scoring below it are dropped (a file's: kept as rows, not classified)
    crop_margin: float = 0.1  # each crop grows by this fraction of its box's width and height on each side
    fallback_whole_image: bool = False  # a photo without boxes gets the whole photo's answer (source whole-image)
    save_crops: str | os.PathLike | None = None  # a folder: each crop as a JPEG
    draw: str | os.PathLike | None = None  # a folder: each photo with its labelled boxes
    exports: Sequence[str] = ()  # written from the run's own tables: DETECTION_EXPORTS
    decode: str = "reduced"  # DECODE_MODES: reduced-scale JPEG decoding (detector and crops), or full resolution


@dataclass
class PredictionOptions:
    """What to classify (``inputs``, or a ``manifest`` and its ``shard``) and how, in groups."""

    inputs: Sequence[str | os.PathLike] = ()  # photo files and/or folders (searched recursively)
    # Or a file listing the photos (birder.runs.photo_lists): one path per line, or a Parquet "path" column
    manifest: str | os.PathLike | None = None
    shard: str | None = None  # "K/N": only the K-th of N contiguous blocks of the photos (independent jobs)
    model: ModelOptions = field(default_factory=ModelOptions)
    execution: ExecutionOptions = field(default_factory=ExecutionOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    decision: DecisionOptions = field(default_factory=DecisionOptions)
    detection: DetectionOptions | None = None  # None: classify whole photos
    geo: GeoOptions = field(default_factory=GeoOptions)  # its exports are birder.geo's (camtrap-dp, coco-ct)

    def input_files(self) -> list[str | os.PathLike]:
        """The files a run reads besides the photos: no output may be one of them."""
        detection = self.detection if self.detection is not None else DetectionOptions()
        (detector, boxes) = (detection.detector, detection.boxes)
        named = (self.model.weights, detector, boxes, self.manifest, self.output.species, self.decision.taxonomy)
        return [path for path in (*named, self.geo.prior, self.geo.locations) if path is not None]
