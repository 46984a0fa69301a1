"""The index folder: what ``birder-index`` writes and reads.

- ``index.json``: the model's fingerprint (weights and preprocessing, :mod:`.fingerprint`), the embedding size, the
  photo count, the vector index's kind and search parameters and the dtype the network ran in. Written last: it
  vouches for the files below.
- ``photos.parquet``: one row per photo, row ``i`` = vector ``i``: path, embedding (the network's, before
  normalisation), EXIF date and GPS position, prediction (the top species) and its probability.
- ``vectors.npy`` and ``vectors.faiss``: the unit vectors and the faiss index (:mod:`.vectors`).
- ``failures.csv``: photos that could not be read, with the reason.
- ``.build/``: the journals of a build or an ``add`` in progress (:mod:`birder.io.journal`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from birder.errors import BirderError
from birder.io.atomic import atomic_write_path
from birder.io.table_files import import_parquet, import_pyarrow
from birder.search.vectors import FAISS_FILE, VECTORS_FILE, Floats, IndexPlan, VectorIndex, chunks, load_index

INDEX_FILE = "index.json"
PHOTOS_FILE = "photos.parquet"
FAILURES_FILE = "failures.csv"
BUILD_DIR = ".build"
# What an index folder is made of (birder.io.outputs): no command writes onto these files of an index it reads, and
# a build's --overwrite clears them, and nothing else
INDEX_OUTPUTS = (INDEX_FILE, PHOTOS_FILE, VECTORS_FILE, FAISS_FILE, FAILURES_FILE, f"{BUILD_DIR}/*")
FORMAT_VERSION = 1
# Columns beside path and embedding, in order
INFO_COLUMNS = ("exif_datetime", "gps_latitude", "gps_longitude", "prediction", "probability")
_ROWS_PER_GROUP = 8192


@dataclass(frozen=True)
class PhotoRecord:
    """One photo's row of ``photos.parquet``."""

    path: str
    embedding: Floats
    exif_datetime: str | None
    gps_latitude: float | None
    gps_longitude: float | None
    prediction: str
    probability: float


def _schema(dim: int) -> Any:
    pa = import_pyarrow()
    return pa.schema(
        [
            ("path", pa.string()),
            ("embedding", pa.list_(pa.float32(), dim)),
            ("exif_datetime", pa.string()),
            ("gps_latitude", pa.float64()),
            ("gps_longitude", pa.float64()),
            ("prediction", pa.string()),
            ("probability", pa.float32()),
        ]
    )


def _record_batch(records: Sequence[PhotoRecord], schema: Any) -> Any:
    pa = import_pyarrow()
    dim = schema.field("embedding").type.list_size
    flat = np.concatenate([r.embedding for r in records]).astype(np.float32) if records else np.zeros(0, np.float32)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)
    columns = [pa.array([r.path for r in records], pa.string()), embedding]
    columns += [pa.array([getattr(r, name) for r in records], schema.field(name).type) for name in INFO_COLUMNS]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _batched(records: Iterable[PhotoRecord], size: int) -> Iterator[list[PhotoRecord]]:
    batch: list[PhotoRecord] = []
    for record in records:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_photos(directory: Path, dim: int, old_count: int, records: Iterable[PhotoRecord]) -> int:
    """Write ``photos.parquet`` and ``vectors.npy``: the first ``old_count`` rows of the current files, then
    ``records``; each file atomically. Returns the total number of photos."""
    pq = import_parquet()
    schema = _schema(dim)
    from birder.search.vectors import normalize

    with atomic_write_path(directory / PHOTOS_FILE) as tmp:
        new_vectors: list[Floats] = []
        with pq.ParquetWriter(tmp, schema) as writer:
            if old_count:
                with pq.ParquetFile(directory / PHOTOS_FILE) as old:
                    for batch in old.iter_batches(batch_size=_ROWS_PER_GROUP):
                        writer.write_batch(batch)
            for batch in _batched(records, _ROWS_PER_GROUP):
                writer.write_batch(_record_batch(batch, schema))
                new_vectors.append(normalize(np.stack([r.embedding for r in batch])))
            if not old_count and not new_vectors:
                writer.write_batch(_record_batch([], schema))

    added = np.concatenate(new_vectors) if new_vectors else np.zeros((0, dim), np.float32)
    total = old_count + len(added)
    with atomic_write_path(directory / VECTORS_FILE) as tmp:
        # Written in place through a memory map: a million vectors never sit in memory twice
        stored = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(total, dim))
        if old_count:
            old_vectors = np.load(directory / VECTORS_FILE, mmap_mode="r")
            for part in chunks(old_count):
                stored[part] = old_vectors[part]
        stored[old_count:] = added
        stored.flush()
        del stored
    return total


@dataclass(frozen=True)
class IndexInfo:
    """``index.json``."""

    model_hash: str
    model: dict[str, Any]  # name / weights / network given, for people reading the file
    preprocessing: dict[str, Any]
    dim: int
    count: int
    plan: IndexPlan
    dtype: str = "float32"  # what the network ran in (birder-index build --dtype); the embeddings are float32
    dtype_reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "model_hash": self.model_hash,
            "model": self.model,
            "preprocessing": self.preprocessing,
            "dim": self.dim,
            "count": self.count,
            "plan": self.plan.as_dict(),
            "dtype": self.dtype,
            "dtype_reason": self.dtype_reason,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IndexInfo:
        plan = IndexPlan(**data["plan"])
        # Indexes written before --dtype ran in float32
        dtype = (data.get("dtype", "float32"), data.get("dtype_reason", "index written before --dtype"))
        return cls(data["model_hash"], data["model"], data["preprocessing"], data["dim"], data["count"], plan, *dtype)


def write_info(directory: Path, info: IndexInfo) -> None:
    with atomic_write_path(directory / INDEX_FILE) as tmp:
        tmp.write_text(json.dumps(info.to_json(), indent=2) + "\n", encoding="utf-8")


def read_info(directory: Path) -> IndexInfo:
    path = Path(directory) / INDEX_FILE
    if not path.is_file():
        raise BirderError(f"'{directory}' holds no index (no {INDEX_FILE}): create one with 'birder-index build'")
    try:
        return IndexInfo.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BirderError(f"cannot read '{path}': {exc}") from None


def check_model(info: IndexInfo, model_hash: str, directory: Path) -> None:
    """Refuse a model whose embeddings would not be comparable with the index's."""
    if info.model_hash != model_hash:
        built_with = info.model.get("name") or info.model.get("weights") or "another model"
        raise BirderError(
            f"index '{directory}' was built with another model or preprocessing ({built_with}, "
            f"hash {info.model_hash[:12]}, this one {model_hash[:12]}): use that model, or build a new index"
        )


class PhotoIndex:
    """An index folder opened for searching: the info, the vector index and the photo table (without embeddings)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.info = read_info(self.directory)
        self.vectors: VectorIndex = load_index(self.directory, self.info.plan)
        columns = ["path", *INFO_COLUMNS]
        self.photos = import_parquet().read_table(self.directory / PHOTOS_FILE, columns=columns)
        if self.photos.num_rows != len(self.vectors):
            raise BirderError(f"index '{self.directory}' is inconsistent: run 'birder-index build' again")
        self._ids: dict[str, int] | None = None

    def __len__(self) -> int:
        return self.photos.num_rows

    def id_of(self, path: str | os.PathLike) -> int:
        """The row of a photo recorded in the index (by its recorded path, or the same file's absolute path)."""
        if self._ids is None:
            self._ids = {p: i for (i, p) in enumerate(self.photos.column("path").to_pylist())}
        for candidate in (os.fspath(path), os.path.abspath(path)):
            if candidate in self._ids:
                return self._ids[candidate]
        raise BirderError(f"'{path}' is not a photo of index '{self.directory}'")

    def rows(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        """The recorded facts of photos ``ids`` (path, EXIF, prediction), in that order."""
        return self.photos.take(np.asarray(ids, dtype=np.int64)).to_pylist()

    def embeddings(self, ids: Sequence[int] | None = None) -> Floats:
        """Unit embeddings of ``ids`` (all photos when None), as stored for search."""
        vectors = self.vectors.vectors
        return np.asarray(vectors if ids is None else vectors[np.asarray(ids, dtype=np.int64)])


def index_inputs(index: PhotoIndex) -> list[str | os.PathLike]:
    """What a command reading ``index`` reads (its outputs must be none of them): the index's files and photos."""
    own = [index.directory / name for name in INDEX_OUTPUTS if "/" not in name]
    return [*own, *index.photos.column("path").to_pylist()]
