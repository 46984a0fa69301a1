"""The ``.bpr`` file: a built location-and-season prior.

A ZIP archive (deflate-compressed; ``numpy.load`` opens it too) holding:

- ``metadata.json``: ``{"format": "birder-prior", "version": 2, "classes": [names in index order],
  "classes_sha256": ..., "settings": {"resolutions": [...], "kernel_days": ..., "floor": ...,
  "pseudo_count": ..., "season_pseudo_count": ..., "neighbour_weight": ..., "pseudo_count_growth": ...,
  "season_resolution": ... or null, "local_season_pseudo_count": ..., "base_resolution": ... or null},
  "settings_search": {how the settings were chosen: method, folds, blocks, and each candidate's settings and
  held-out log-likelihood} or null, "info": {records read and used, build time, ...}}``;
- ``global_counts.npy``: float64 ``[classes]``, weighted record counts per class;
- ``day_counts.npy``: float32 ``[classes, 365]``, dated record counts per class and day-of-year bin;
- for each resolution ``R``, the sparse counts per (H3 cell, class): ``r<R>_cells.npy`` (uint64, sorted),
  ``r<R>_indptr.npy`` (int64, ``cells + 1``), ``r<R>_classes.npy`` (int32) and ``r<R>_counts.npy`` (float32);
- with local seasons (``season_resolution`` set), the dated counts per (season cell, class, day bin) in the same
  sparse form, ``season_cells.npy`` ... ``season_counts.npy``, an entry's "class" being ``class * 365 + bin``.

Version 1 files (before the settings were chosen from the records) have the first five settings only and no
``settings_search``; they load with the others at the values that make the same prior as before.

Counts are stored, not probabilities: the smoothing happens at lookup, so the file is small (most cells hold a few
species) and the settings it was built with are all it needs. Written atomically; read without pickle.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from birder.errors import BirderError
from birder.geo.grid import import_h3
from birder.geo.prior import CellCounts, LocationPrior, PriorSettings
from birder.io.atomic import atomic_write_path

FORMAT_NAME = "birder-prior"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_METADATA = "metadata.json"
_LEVEL_ARRAYS = ("cells", "indptr", "classes", "counts")


def _write_array(archive: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    archive.writestr(f"{name}.npy", buffer.getvalue())


def save_prior(prior: LocationPrior, path: str | os.PathLike) -> Path:
    """Write ``prior`` to ``path`` (a ``.bpr`` file) atomically."""
    path = Path(path)
    metadata = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "classes": prior.classes,
        "classes_sha256": prior.classes_sha256,
        "settings": {**asdict(prior.settings), "resolutions": list(prior.settings.resolutions)},
        "settings_search": prior.settings_search,
        "info": prior.info,
    }
    with atomic_write_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(_METADATA, json.dumps(metadata, ensure_ascii=False, indent=1))
        _write_array(archive, "global_counts", prior.global_counts.astype(np.float64))
        _write_array(archive, "day_counts", prior.day_counts.astype(np.float32))
        for resolution, level in prior.levels.items():
            for name in _LEVEL_ARRAYS:
                _write_array(archive, f"r{resolution}_{name}", getattr(level, name))
        if prior.season_counts is not None:
            for name in _LEVEL_ARRAYS:
                _write_array(archive, f"season_{name}", getattr(prior.season_counts, name))
    return path


def _read_array(archive: zipfile.ZipFile, name: str) -> np.ndarray:
    with archive.open(f"{name}.npy") as handle:
        return np.lib.format.read_array(io.BytesIO(handle.read()), allow_pickle=False)


def load_prior(path: str | os.PathLike) -> LocationPrior:
    """Read a ``.bpr`` file; a missing, damaged or foreign file is refused in one line."""
    path = Path(path)
    if not path.is_file():
        raise BirderError(f"prior file '{path}' does not exist (build one with birder-prior build)")
    import_h3()  # lookups need it: say so now, not at the first photo
    try:
        with zipfile.ZipFile(path) as archive:
            metadata = json.loads(archive.read(_METADATA).decode("utf-8"))
            _check_format(metadata, path)
            settings = PriorSettings(**metadata["settings"])
            levels = {
                resolution: CellCounts(*(_read_array(archive, f"r{resolution}_{name}") for name in _LEVEL_ARRAYS))
                for resolution in settings.resolutions
            }
            global_counts = _read_array(archive, "global_counts")
            day_counts = _read_array(archive, "day_counts")
            season_counts = None
            if settings.season_resolution is not None:
                season_counts = CellCounts(*(_read_array(archive, f"season_{name}") for name in _LEVEL_ARRAYS))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, TypeError) as exc:
        raise BirderError(f"'{path}' is not a readable prior file ({' '.join(str(exc).split())})") from None

    classes = list(metadata["classes"])
    if len(global_counts) != len(classes) or day_counts.shape[0] != len(classes):
        raise BirderError(f"'{path}' is damaged: its arrays do not match its {len(classes)} classes")
    return LocationPrior(
        classes,
        settings,
        global_counts,
        levels,
        day_counts,
        dict(metadata.get("info") or {}),
        season_counts,
        metadata.get("settings_search"),
    )


def _check_format(metadata: Any, path: Path) -> None:
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise BirderError(f"'{path}' is not a birder prior file")
    if metadata.get("version") not in READABLE_VERSIONS:
        raise BirderError(
            f"'{path}' is a prior file of format version {metadata.get('version')}; this birder reads versions "
            f"{', '.join(str(version) for version in READABLE_VERSIONS)}: rebuild it with birder-prior build"
        )


def load_prior_for(path: str | os.PathLike, class_names: list[str]) -> LocationPrior:
    """A prior file for a model with ``class_names``; one built for other classes is refused in one line."""
    prior = load_prior(path)
    prior.check_classes(class_names, source=f"prior file '{path}'")
    return prior
