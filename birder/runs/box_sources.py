"""Where a crop-then-classify run's boxes come from: a *box source*, which :mod:`birder.runs.detect` asks for each
photo's boxes; everything after (crops, the classifier's batches, the decision order, the tables, events, exports,
resume, shards) is the same whatever the source.

- The detector (``birder-predict --detector FILE``): :class:`birder.runs.detect.DetectionStep` finds the boxes
  in each batch of decoded photos; every box is cropped and classified.
- A boxes file (``birder-predict --boxes FILE``): :class:`FileBoxes`, the boxes a user already has (a MegaDetector
  batch output, SpeciesNet predictions, COCO: :mod:`birder.io.box_files`). The animal detections scoring at least
  the threshold are cropped and classified; the others pass through untouched, each a row with its box, category
  and score and empty species columns: people and vehicles at or above the threshold count as such in events and
  exports (``source`` ``passed``), detections below it are kept for reference only (no ``source``: no
  observation, as MegaDetector's own tools leave them out). A photo the file lists as failed, or does not list,
  is a failure of the run (never decoded); paths of the file that match no photo of the run are named in one
  warning line and added to the failures table (:meth:`FileBoxes.unmatched_failures`).
"""

from __future__ import annotations

import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from birder.errors import BirderError
from birder.inference.crops import md_with_classifications, write_md_json
from birder.inference.dataset import DetectionInput
from birder.io.box_files import BoxFile, MatchedBoxes, boxes_root, normal_path, read_box_file, split_detections
from birder.io.download import sha256_file
from birder.io.images import ReducedImage
from birder.runs.predict_options import PROG, DetectionOptions

UNMATCHED_SHOWN = 3  # paths named in the warning about the file's paths that match no photo


@dataclass(frozen=True)
class SourceBox:
    """One box of a photo, as its source gives it."""

    number: int  # its place among the photo's boxes: the detector's best first, a file's its index in the file
    corners: tuple[float, float, float, float]  # x1, y1, x2, y2 in the photo's pixels (EXIF orientation applied)
    category: str  # the detection category's name (det_class)
    score: float
    classify: bool = True  # crop and classify it; else it passes through untouched
    counted: bool = True  # at or above the threshold: an observation of its kind; else kept as a row only


class BoxSource(ABC):
    """Where a crop-then-classify run's boxes come from (see the module's docstring). An instance serves one run."""

    options: DetectionOptions  # the run's detection group: threshold, margin, fallback, files to write

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """What shapes the rows (a resume must match it)."""

    @abstractmethod
    def input_transform(self) -> Callable[[Image.Image], DetectionInput]:
        """The run's loader transform: each photo decoded (at a reduced scale or in full) and what :meth:`boxes`
        needs besides it (the detector's input)."""

    def decodes_in_full(self) -> bool:
        """Whether :meth:`input_transform` keeps each photo at full resolution (36 MB for 12 MP): the run's loader
        then hands over few photos at a time."""
        return True

    def start(self, paths: Sequence[str], *, report: bool, whole_list: bool) -> None:
        """The run's photos are known (``paths``: the plan's, every rank's the same); ``report``: this process
        speaks for the run (rank 0); ``whole_list``: ``paths`` are all the photos listed, not one shard's block."""
        return None

    def failure(self, path: str) -> str | None:
        """Why ``path`` has no boxes to look for (it is then never decoded), or None."""
        return None

    @abstractmethod
    def boxes(self, inputs: Sequence[DetectionInput], paths: Sequence[str]) -> list[list[SourceBox]]:
        """The boxes of each decoded photo of a batch (what :meth:`input_transform` made of them), in the
        full-resolution photo's pixels."""

    def unmatched_failures(self) -> list[tuple[str, str]]:
        """(rank 0, after the merge) Failure rows ``(path, reason)`` of what the source names that is no photo of
        the run."""
        return []


class PhotoInput:
    """The loader's transform of a run whose boxes need nothing but the decoded photo (a boxes file): decoded in
    full, no detector input."""

    def __call__(self, photo: Image.Image) -> DetectionInput:
        return DetectionInput(ReducedImage(photo, photo.size, 1), torch.empty(0))


class FileBoxes(BoxSource):
    """The boxes of a file (``--boxes FILE``; see the module's docstring). The file is read when the source is made
    (a malformed file is refused before the run clears or claims anything), its paths resolved against
    ``--boxes-root`` or the inputs' folder, and read again once the photos are known when the root they give
    differs (photos of a manifest)."""

    def __init__(self, options: DetectionOptions, inputs: Sequence[str | os.PathLike]) -> None:
        if options.boxes is None:
            raise ValueError("FileBoxes needs DetectionOptions.boxes")
        self.options = options
        self.inputs = inputs
        self.path = Path(options.boxes)
        self.file: BoxFile = read_box_file(self.path, boxes_root(options.boxes_root, inputs))
        self.sha256 = sha256_file(self.path)
        self._matched: MatchedBoxes | None = None
        self._whole_list = True

    def settings(self) -> dict[str, Any]:
        options = self.options
        return {
            "boxes": os.path.abspath(self.path),
            "boxes_sha256": self.sha256,  # the same file's name with other boxes in it is another run
            "boxes_root": os.path.abspath(options.boxes_root) if options.boxes_root is not None else None,
            "det_threshold": options.det_threshold,
            "crop_margin": options.crop_margin,
            "fallback_whole_image": options.fallback_whole_image,
        }

    def input_transform(self) -> Callable[[Image.Image], DetectionInput]:
        return PhotoInput()

    @property
    def matched(self) -> MatchedBoxes:
        if self._matched is None:
            raise RuntimeError("FileBoxes.start matches the file to the run's photos, and has not run")
        return self._matched

    def start(self, paths: Sequence[str], *, report: bool, whole_list: bool) -> None:
        root = boxes_root(self.options.boxes_root, self.inputs, paths)
        if root != self.file.root:
            self.file = read_box_file(self.path, root)
        self._matched = self.file.match(paths)
        self._whole_list = whole_list
        unmatched = self.matched.unmatched
        if report and whole_list and unmatched:
            shown = ", ".join(f"'{file}'" for file in unmatched[:UNMATCHED_SHOWN])
            more = f" and {len(unmatched) - UNMATCHED_SHOWN} more" if len(unmatched) > UNMATCHED_SHOWN else ""
            print(
                f"{PROG}: warning: {len(unmatched)} path(s) of the boxes file '{self.path}' match no photo of this "
                f"run (resolved against '{self.file.root}'; check --boxes-root): {shown}{more}; listed in "
                "failures.csv",
                file=sys.stderr,
            )

    def failure(self, path: str) -> str | None:
        entry = self.matched.by_photo.get(path)
        if entry is None:
            return f"not in the boxes file '{self.path.name}'"
        if entry.failure is not None:
            return f"failed in the boxes file '{self.path.name}': {entry.failure}"
        return None

    def boxes(self, inputs: Sequence[DetectionInput], paths: Sequence[str]) -> list[list[SourceBox]]:
        threshold = self.options.det_threshold
        animals = self.file.animal_categories
        found = []
        for item, path in zip(inputs, paths, strict=True):
            entry = self.matched.by_photo[path]
            chosen = {detection.index for detection in split_detections(entry, threshold, animals).classify}
            found.append(
                [
                    SourceBox(
                        detection.index,
                        detection.pixel_box(item.photo.full_size),
                        detection.category,
                        detection.conf,
                        classify=detection.index in chosen,
                        counted=detection.conf >= threshold,
                    )
                    for detection in entry.detections
                ]
            )
        return found

    def unmatched_failures(self) -> list[tuple[str, str]]:
        if not self._whole_list:
            return []  # one shard's job sees only its block of the photos: the file's other paths are the others'
        reason = f"in the boxes file '{self.path.name}' but no photo of this run (check --boxes-root or the inputs)"
        return [(normal_path(file, self.file.root), reason) for file in self.matched.unmatched]

    def write_md(
        self,
        destination: Path,
        classified: Mapping[str, Mapping[int, Sequence[tuple[str, float]]]],
        *,
        class_names: Sequence[str],
        descriptions: Mapping[str, str] | None,
        classifier: str | None,
    ) -> Path:
        """The file written back as a MegaDetector batch output with the species of each classified detection
        (``classified``: photo path -> box number (the detection's index in the file) -> ``(class, probability)``
        pairs), every other field as it was (:func:`~birder.inference.crops.md_with_classifications`)."""
        by_photo = self.matched.by_photo
        pairs = {
            (by_photo[path].entry, number): top
            for (path, boxes) in classified.items()
            for (number, top) in boxes.items()
        }
        document = md_with_classifications(
            self.file.megadetector_document(),
            pairs,
            class_names=class_names,
            descriptions=descriptions,
            classifier=classifier,
        )
        if os.path.exists(destination) and os.path.samefile(destination, self.path):
            raise BirderError(f"--export md-json would replace the boxes file '{self.path}', an input of this run")
        return write_md_json(destination, document)
