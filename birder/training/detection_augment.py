"""Copy-paste augmentation for detectors: groups of animals made from the training set's own boxes.

A detector counts animals only if it has seen them in groups: touching, and partly hiding one another. Training
photos of single, well-separated animals teach it neither, and it then answers a pair of touching animals with one
box around both, or loses the one behind (a count of boxes that is not a count of animals). With probability ``p``
a training photo gets up to ``max_objects`` boxes of another training photo pasted into it (its pixels inside the
box, after both photos' own augmentation), most of them beside or over an object already there, so the two touch
or one partly hides the other; a paste never hides more than ``max_hidden`` of any box already there, which stays
labelled (an animal mostly out of sight would teach the detector to find what it cannot see). Box-level copy-paste:
no masks are needed, so it works on any COCO box file.
"""

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from birder.data.detection import DetectionDataset, DetectionSample

# Of the pasted boxes, this share is placed against an object already in the photo (touching or overlapping it);
# the rest anywhere.
BESIDE_SHARE = 0.8
_PLACEMENT_TRIES = 20
# Boxes pasted into one photo at most, and the most of a box already there the pastes may hide
MAX_PASTED = 3
MAX_HIDDEN = 0.4


def _intersection(a: Sequence[float], b: Sequence[float]) -> float:
    """Area shared by two xyxy boxes."""
    return max(min(a[2], b[2]) - max(a[0], b[0]), 0.0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)


def paste_boxes(
    image: torch.Tensor,
    target: dict[str, torch.Tensor],
    donor_image: torch.Tensor,
    donor_target: dict[str, torch.Tensor],
    rng: np.random.Generator,
    *,
    max_objects: int = MAX_PASTED,
    max_hidden: float = MAX_HIDDEN,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``image`` (``[C, H, W]``) with up to ``max_objects`` of the donor's boxes pasted in, and its target with
    their boxes and labels added (xyxy, the image's pixels). Each pasted box lies beside or over a box already
    there (:data:`BESIDE_SHARE` of them) or anywhere, and covers at most ``max_hidden`` of any box already there
    (together with the earlier pastes); a box that finds no such place is not pasted."""
    (height, width) = image.shape[-2:]
    boxes = [[float(v) for v in box] for box in target["boxes"].tolist()]
    labels = target["labels"].tolist()
    hidden = [0.0] * len(boxes)  # area of each box covered by pastes so far (an upper bound: pastes may overlap)
    image = image.clone()
    donors = list(zip(donor_target["boxes"].tolist(), donor_target["labels"].tolist(), strict=True))
    for position in rng.permutation(len(donors))[:max_objects]:
        (box, label) = donors[int(position)]
        (x1, y1) = (round(box[0]), round(box[1]))
        (w, h) = (round(box[2]) - x1, round(box[3]) - y1)
        if w < 2 or h < 2 or w > width or h > height:
            continue
        for _ in range(_PLACEMENT_TRIES):
            if boxes and rng.random() < BESIDE_SHARE:
                anchor = boxes[int(rng.integers(0, len(boxes)))]
                # Anywhere the pasted box meets or overlaps the anchor
                x = int(rng.integers(int(anchor[0]) - w, int(anchor[2]) + 1))
                y = int(rng.integers(int(anchor[1]) - h, int(anchor[3]) + 1))
            else:
                (x, y) = (int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)))
            if not (0 <= x <= width - w and 0 <= y <= height - h):
                continue
            pasted = [float(x), float(y), float(x + w), float(y + h)]
            covered = [hidden[i] + _intersection(pasted, other) for i, other in enumerate(boxes)]
            areas = [(other[2] - other[0]) * (other[3] - other[1]) for other in boxes]
            if all(c <= max_hidden * a for c, a in zip(covered, areas, strict=True)):
                break
        else:
            continue
        image[:, y : y + h, x : x + w] = donor_image[:, y1 : y1 + h, x1 : x1 + w]
        hidden = [*covered, 0.0]
        boxes.append(pasted)
        labels.append(int(label))
    new_target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }
    return (image, new_target)


class CopyPasteDataset(Dataset):
    """A training :class:`~birder.data.detection.DetectionDataset` whose samples get, with probability
    ``probability``, boxes of another of its photos pasted in (:func:`paste_boxes`). Seeded by ``(seed, epoch,
    index)`` as the base's own augmentation is: a resumed run or another worker sees the same photos."""

    def __init__(self, base: DetectionDataset, probability: float, *, seed: int = 0) -> None:
        (self.base, self.probability, self.seed) = (base, probability, seed)
        self.paths = base.paths

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int] | int) -> DetectionSample:
        (epoch, index) = key if isinstance(key, tuple) else (None, key)
        sample = self.base[key]
        rng = np.random.default_rng([abs(self.seed), 0 if epoch is None else epoch + 1, index])
        if sample.image is None or len(self.base) < 2 or rng.random() >= self.probability:
            return sample
        donor_index = int(rng.integers(0, len(self.base) - 1))
        donor_index += donor_index >= index  # another photo
        donor = self.base[(epoch, donor_index) if epoch is not None else donor_index]
        if donor.image is None or donor.image.shape != sample.image.shape or len(donor.target["boxes"]) == 0:
            return sample
        (image, target) = paste_boxes(sample.image, sample.target, donor.image, donor.target, rng)
        return sample._replace(image=image, target=target)
