"""Stand-in unknown photos made from known ones, for choosing the unknown test (:mod:`birder.inference.unknown_choice`).

Folds over classes hold known classes out as stand-in unknowns, but the backbone learned those classes: their photos
sit apart from the kept ones, easier to tell than a species the network never saw, and easier for some tests than
for others (on generated textures every candidate separated them perfectly; on digits the folds ranked knn first
where plain Mahalanobis was the best test on true unknowns by 0.05). Photos the network never saw can be made from
the validation photos themselves; none of them is a new species, but each fails the network in its own way, so the
choice scores every candidate on several kinds (:data:`MADE_KINDS`), their mean set against the folds' figure:

- ``blend``: two photos of different classes, half and half;
- ``cutmix``: one half (left or top) of a photo with the other half of a photo of another class;
- ``shuffle``: a photo cut into a 4 x 4 grid of tiles and the tiles shuffled (its colours and textures kept, its
  shape gone);
- ``channels``: a photo with its red, green and blue swapped (another colouring of a known shape); grey photos are
  inverted instead, having no colours to swap;
- ``rotate``: a photo turned by a quarter, a half or three quarters of a turn (a half turn only when it is not
  square).

On the 15 benchmark runs (``benchmarks/unknown_choice.py``) the candidates' AUROCs against these photos followed
their AUROCs on true unknowns more closely than the folds did on four of the five generators (Spearman correlation
over the candidates: cutmix 0.90-0.99 on digits where the folds had 0.25-0.34); on generated shapes none did.

The photos are made in pixel space (the preprocessed tensor brought back to [0, 1] with the model's ``rgb_stats``),
then normalised again, so the network sees them as it sees a decoded photo.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

MADE_KINDS = ("blend", "cutmix", "shuffle", "channels", "rotate")
TWO_PHOTO_KINDS = ("blend", "cutmix")  # the others are made from the first photo of their pair alone
# Photos made per kind (birder-calibrate --stand-in-photos): 5 kinds of 200 cost the network 1,000 more photos
DEFAULT_PER_KIND = 200
TILES = 4  # shuffle: tiles per side
# Channel orders other than (0, 1, 2)
_CHANNEL_ORDERS = ((1, 2, 0), (2, 0, 1), (0, 2, 1), (2, 1, 0), (1, 0, 2))
# A photo whose channels differ by less than this (mean absolute, in [0, 1]) is grey: swapping does nothing
_GREY = 2 / 255


def pair_sources(targets: Sequence[int] | np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` pairs of row indices ``[count, 2]`` into ``targets``, the two of a pair from different classes
    (where there is only one class, any two rows). One-photo kinds use the first of each pair."""
    targets = np.asarray(targets)
    first = rng.integers(len(targets), size=count)
    second = rng.integers(len(targets), size=count)
    if len(np.unique(targets)) > 1:
        for row in np.flatnonzero(targets[first] == targets[second]):
            others = np.flatnonzero(targets != targets[first[row]])
            second[row] = others[rng.integers(len(others))]
    return np.stack([first, second], axis=1)


def make_stand_in(
    first: torch.Tensor, second: torch.Tensor | None, kind: str, rng: np.random.Generator
) -> torch.Tensor:
    """One made photo of ``kind`` from pixel tensors ``[3, H, W]`` in [0, 1] (``second``: the other class's photo,
    needed by :data:`TWO_PHOTO_KINDS` only)."""
    if kind in TWO_PHOTO_KINDS and second is None:
        raise ValueError(f"a '{kind}' stand-in is made from two photos; the second is missing")
    if kind == "blend":
        return 0.5 * first + 0.5 * second
    if kind == "cutmix":
        made = first.clone()
        if rng.random() < 0.5:
            half = first.shape[2] // 2
            made[:, :, half:] = second[:, :, half:]
        else:
            half = first.shape[1] // 2
            made[:, half:, :] = second[:, half:, :]
        return made
    if kind == "shuffle":
        return _shuffled_tiles(first, rng)
    if kind == "channels":
        if (first[0] - first[1]).abs().mean() < _GREY and (first[1] - first[2]).abs().mean() < _GREY:
            return 1.0 - first
        return first[list(_CHANNEL_ORDERS[int(rng.integers(len(_CHANNEL_ORDERS)))])]
    if kind == "rotate":
        square = first.shape[1] == first.shape[2]
        quarters = int(rng.integers(1, 4)) if square else 2
        return torch.rot90(first, quarters, dims=(1, 2))
    raise ValueError(f"unknown kind of stand-in '{kind}'; one of: {', '.join(MADE_KINDS)}")


def _shuffled_tiles(photo: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """The photo's :data:`TILES` x :data:`TILES` tiles in a random order (a margin that does not divide stays)."""
    (height, width) = (photo.shape[1] // TILES, photo.shape[2] // TILES)
    tiles = [
        photo[:, row * height : (row + 1) * height, col * width : (col + 1) * width]
        for row in range(TILES)
        for col in range(TILES)
    ]
    made = photo.clone()
    for position, source in enumerate(rng.permutation(len(tiles))):
        (row, col) = divmod(position, TILES)
        made[:, row * height : (row + 1) * height, col * width : (col + 1) * width] = tiles[source]
    return made
