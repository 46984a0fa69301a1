"""Queries against an index folder: by photo (embedded with the index's model) or by a photo already recorded."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from birder.errors import BirderError
from birder.inference.classification import infer_image
from birder.io.images import load_image
from birder.search.build import LoadedModel
from birder.search.store import PhotoIndex, check_model


def embed_photo(loaded: LoadedModel, photo: Any) -> np.ndarray:
    """The embedding ``[D]`` of a photo (a path or a PIL image); raises ImageDecodeError when it does not decode."""
    (_, embedding) = infer_image(loaded.net, load_image(photo), loaded.transform, return_embedding=True)
    assert embedding is not None
    return embedding[0]


def similar(index: PhotoIndex, vector: np.ndarray, k: int, exclude: int | None = None) -> list[dict[str, Any]]:
    """The ``k`` photos of ``index`` nearest to ``vector``, most similar first (``exclude``: a photo id to skip)."""
    (sims, ids) = index.vectors.search(vector[None], k + (exclude is not None))
    pairs = [(int(i), float(s)) for (i, s) in zip(ids[0], sims[0], strict=True) if i >= 0 and i != exclude][:k]
    rows = index.rows([i for (i, _) in pairs])
    return [{"id": i, "similarity": s, **row} for ((i, s), row) in zip(pairs, rows, strict=True)]


def _require_photos(index: PhotoIndex) -> None:
    """Refuse to query an index without photos: an empty answer would look like "nothing similar"."""
    if len(index) == 0:
        raise BirderError(
            f"index '{index.directory}' holds no photos: add some with 'birder-index add PHOTOS -o {index.directory}'"
        )


def query_photo(index: PhotoIndex, loaded: LoadedModel, photo: str | os.PathLike, k: int) -> list[dict[str, Any]]:
    """The photos nearest to a photo file, embedded with ``loaded`` (refused if it is not the index's model, or
    when the index holds no photos)."""
    _require_photos(index)
    check_model(index.info, loaded.fingerprint, index.directory)
    return similar(index, embed_photo(loaded, photo), k)


def query_recorded(index: PhotoIndex, path: str | os.PathLike, k: int) -> list[dict[str, Any]]:
    """The photos nearest to a photo recorded in the index (itself left out); needs no model."""
    _require_photos(index)
    photo_id = index.id_of(path)
    return similar(index, index.embeddings([photo_id])[0], k, exclude=photo_id)
