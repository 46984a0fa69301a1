"""``birder-index build`` and ``add``: photos -> embeddings -> the index folder (:mod:`.store`).

The photos go through birder-predict's loader and batch loop (:class:`~birder.inference.predictor.Predictor`: the
same decoding, transform and forward pass), and each batch's rows through the crash-safe journal
(:mod:`birder.io.journal`) in ``<index>/.build/``: an interrupted run continues with ``resume=True``, skipping the
photos already done. Photos that cannot be decoded go to ``failures.csv`` and are not retried. Once every photo is
done the journals become ``photos.parquet``, ``vectors.npy`` and the faiss index, then ``index.json``.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from birder.data.transforms import ClassificationTransform
from birder.errors import BirderError
from birder.inference.dataset import discover_images
from birder.inference.model import AS_LOADED, load_for_inference
from birder.inference.optimize import DtypeChoice
from birder.inference.predictor import PredictionBatch, Predictor
from birder.io.journal import JournalSet, merged_rows, prepare_run
from birder.io.outputs import OutputFolder
from birder.io.table_files import PATH_COLUMN, Column, Row, TableSpec, read_csv_table, string_columns, write_table
from birder.net.base import BaseNet
from birder.search.fingerprint import model_fingerprint, preprocessing_of
from birder.search.store import (
    BUILD_DIR,
    FAILURES_FILE,
    INDEX_FILE,
    INDEX_OUTPUTS,
    IndexInfo,
    PhotoIndex,
    PhotoRecord,
    check_model,
    read_info,
    write_info,
    write_photos,
)
from birder.search.vectors import VECTORS_FILE, VectorIndex, build_index, choose_plan, read_faiss

PHOTOS_SPEC = TableSpec(
    "photos",
    (
        Column(PATH_COLUMN),
        Column("embedding"),  # base64 of little-endian float32: exact and ~4x faster than 1024 formatted floats
        Column("exif_datetime"),
        Column("gps_latitude", "float64", ".7f"),
        Column("gps_longitude", "float64", ".7f"),
        Column("prediction"),
        Column("probability", "float32", ".6f"),
    ),
    marks_done=True,
)
FAILURES_SPEC = TableSpec("failures", string_columns(PATH_COLUMN, "error"), fixed_format="csv", marks_done=True)
SPECS = (FAILURES_SPEC, PHOTOS_SPEC)


@dataclass
class IndexOptions:
    """What ``build`` / ``add`` index and how (the command line's arguments, same names)."""

    inputs: Sequence[str | os.PathLike]
    output: Path
    model: str | None = None
    weights: str | os.PathLike | None = None
    network: str | None = None
    batch_size: int = 32
    num_workers: int = min(4, os.cpu_count() or 1)
    device: str = "auto"
    dtype: str = "auto"  # as birder-predict's: bfloat16 where native, else float32 (embeddings stored float32)
    resume: bool = False
    overwrite: bool = False  # build: replace the index in ``output`` (its files only)
    chunk_size: int = 256
    progress: bool = True


@dataclass(frozen=True)
class IndexReport:
    total: int  # photos in the index
    added: int  # photos this run embedded (a resume's earlier ones included)
    failures: int  # photos of this run that could not be read
    plan_description: str
    seconds: float
    dtype: str = "float32"  # what the network ran in, and why


@dataclass
class LoadedModel:
    """A model ready to embed photos, with what identifies its embeddings."""

    net: BaseNet
    transform: ClassificationTransform
    class_names: list[str]
    fingerprint: str
    description: dict[str, Any]
    dtype: DtypeChoice = AS_LOADED  # what the network runs in, and why


def load_embedding_model(
    model: str | None,
    weights: str | os.PathLike | None,
    network: str | None,
    device: str = "auto",
    dtype: str = "auto",
) -> LoadedModel:
    """The model a command names (``-n`` / ``--weights``), its transform and fingerprint, converted for ``dtype``
    (``auto``: :func:`~birder.inference.optimize.choose_dtype`, as birder-predict decides).

    The fingerprint is taken of the weights as loaded, before any conversion: an index built in bfloat16 is
    queried with the same model in float32 (or the other way round), and birder-serve checks it the same way.
    """
    loaded = load_for_inference(model, weights, network, device=device)
    fingerprint = model_fingerprint(loaded.net, loaded.transform)
    loaded = loaded.with_dtype(dtype)
    description = {"name": model, "weights": os.path.abspath(weights) if weights else None, "network": network}
    return LoadedModel(loaded.net, loaded.transform, loaded.class_names, fingerprint, description, loaded.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------------


def encode_embedding(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def decode_embedding(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32)


def batch_rows(batch: PredictionBatch, paths: Sequence[str], class_names: Sequence[str]) -> dict[str, list[Row]]:
    """The journal rows of one batch: a photos row per embedded photo, a failures row per unreadable one."""
    rows: dict[str, list[Row]] = {"failures": [[paths[i], reason] for (i, reason) in batch.failures], "photos": []}
    if not batch.indices:
        return rows

    assert batch.embeddings is not None
    top = batch.probabilities.argmax(axis=1) if class_names else None
    for row, index in enumerate(batch.indices):
        # The top species for now; the decision order's label (``unknown`` included) will take its place
        prediction = class_names[int(top[row])] if top is not None else ""
        probability = float(batch.probabilities[row, top[row]]) if top is not None else None
        metadata = batch.metadata[row]
        values = [paths[index], encode_embedding(batch.embeddings[row]), *metadata, prediction, probability]
        rows["photos"].append(PHOTOS_SPEC.format_row(values))
    return rows


def _records(rows: Iterator[Row]) -> Iterator[PhotoRecord]:
    for row in rows:
        (path, embedding, taken, latitude, longitude, prediction, probability) = row
        yield PhotoRecord(
            path,
            decode_embedding(embedding),
            taken or None,
            float(latitude) if latitude else None,
            float(longitude) if longitude else None,
            prediction,
            float(probability) if probability else float("nan"),
        )


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------


def _known_paths(directory: Path) -> set[str]:
    """Photos the index already holds or already failed on (an ``add`` skips them)."""
    index = PhotoIndex(directory)
    known = set(index.photos.column("path").to_pylist())
    failures = directory / FAILURES_FILE
    if failures.is_file():
        (_, rows) = read_csv_table(failures)
        known.update(row[0] for row in rows)
    return known


class NothingReadableError(BirderError):
    """No photo of a build could be read: no index is written, only the list of what failed."""


def run_index(options: IndexOptions, *, add: bool, loaded: LoadedModel | None = None) -> IndexReport:
    """Build a new index in ``options.output`` (``add=False``) or add photos to the one there (``add=True``)."""
    started = time.perf_counter()
    output = Path(options.output)
    folder = OutputFolder(output, "birder-index build", INDEX_OUTPUTS, option="-o")
    if not add:
        if (output / INDEX_FILE).exists() and not options.overwrite:
            raise BirderError(
                f"'{output}' already holds an index: add photos with 'birder-index add', replace it with "
                "--overwrite, or pick another -o"
            )
        folder.check(resume=options.resume, overwrite=options.overwrite)
    old_info = read_info(output) if add else None
    loaded = loaded or load_embedding_model(
        options.model, options.weights, options.network, options.device, options.dtype
    )
    if not add:  # the model loaded: only now does --overwrite clear the earlier index
        folder.claim(resume=options.resume, overwrite=options.overwrite)
    if old_info is not None:
        check_model(old_info, loaded.fingerprint, output)

    known = _known_paths(output) if add else set()
    paths = [os.path.abspath(path) for path in discover_images(options.inputs)]
    paths = [path for path in paths if path not in known]
    journal_dir = output / BUILD_DIR
    # The resolved dtype: resuming an ``auto`` run on another machine must not mix dtypes in one build
    settings = {"model_hash": loaded.fingerprint, "operation": "add" if add else "build", "dtype": loaded.dtype.dtype}
    state = prepare_run(journal_dir, SPECS, "csv", settings, options.resume)
    remaining = [index for (index, path) in enumerate(paths) if path not in state.done]
    if state.done:
        print(f"Resuming: {len(paths) - len(remaining)} of {len(paths)} photos already done", file=sys.stderr)

    _embed(options, loaded, paths, remaining, journal_dir, state.attempt)
    try:
        (total, added, failures, index) = _finish(output, loaded, paths, old_info)
    except NothingReadableError:
        if not add:  # only the list of unreadable photos is left: the same command may run here again
            folder.release()
        raise
    if not add:
        folder.finish()
    seconds = time.perf_counter() - started
    return IndexReport(total, added, failures, index.plan.describe(), seconds, str(loaded.dtype))


def _embed(
    options: IndexOptions, loaded: LoadedModel, paths: list[str], remaining: list[int], journal_dir: Path, attempt: int
) -> None:
    predictor = Predictor(
        loaded.net,
        loaded.transform,
        batch_size=options.batch_size,
        num_workers=options.num_workers,
        return_embedding=True,
    )
    journals = JournalSet(journal_dir, SPECS, 0, attempt, options.chunk_size)
    progress = tqdm(total=len(remaining), unit="img", desc="Indexing", disable=not options.progress, dynamic_ncols=True)
    # Closed whatever happens: the finished batches stay durable for a resume
    with progress, contextlib.closing(journals):
        for batch in predictor.predict_files(paths, remaining):
            journals.add(batch_rows(batch, paths, loaded.class_names), batch.num_photos)
            progress.update(batch.num_photos)


def _finish(
    output: Path, loaded: LoadedModel, paths: list[str], old_info: IndexInfo | None
) -> tuple[int, int, int, VectorIndex]:
    """Journals -> photos table, vectors, faiss index, failures table, index.json; then the journals go."""
    journal_dir = output / BUILD_DIR
    order = {path: index for (index, path) in enumerate(paths)}
    dim = loaded.net.embedding_size
    old_count = old_info.count if old_info is not None else 0
    records = _records(merged_rows(journal_dir, PHOTOS_SPEC, "csv", order, False))
    new_failures = list(merged_rows(journal_dir, FAILURES_SPEC, "csv", order, False))
    old_failures: list[Row] = []
    if old_info is not None and (output / FAILURES_FILE).is_file():
        # Rows of this run already there (a crash after this write, then a resume) are not listed twice
        this_run = {row[0] for row in new_failures}
        old_failures = [row for row in read_csv_table(output / FAILURES_FILE)[1] if row[0] not in this_run]
    write_table(output / FAILURES_FILE, FAILURES_SPEC, old_failures + new_failures)

    first = next(records, None)
    if first is None and old_info is None:
        # An index of no photo answers every query with nothing: refuse to write one, and say where the reasons are
        shutil.rmtree(journal_dir, ignore_errors=True)
        raise NothingReadableError(
            f"none of the {len(new_failures)} photos could be read, so no index was written: the reasons are in "
            f"{output / FAILURES_FILE}"
        )
    if first is not None:
        records = itertools.chain([first], records)
    total = write_photos(output, dim, old_count, records)

    index = _vector_index(output, total, dim, old_info)
    index.save(output)
    dtype = _recorded_dtype(loaded.dtype, old_info)
    preprocessing = preprocessing_of(loaded.transform)
    info = IndexInfo(loaded.fingerprint, loaded.description, preprocessing, dim, total, index.plan, *dtype)
    write_info(output, info)
    shutil.rmtree(journal_dir, ignore_errors=True)  # only now: a crash before this line is resumable
    return (total, total - old_count, len(new_failures), index)


def _recorded_dtype(choice: DtypeChoice, old_info: IndexInfo | None) -> tuple[str, str]:
    """``(dtype, reason)`` for index.json: this run's, or every dtype that embedded photos (``float32+bfloat16``)
    when an ``add`` ran in another one than the index before it (the embeddings stay comparable: same weights)."""
    if old_info is None:
        return (choice.dtype, choice.reason)
    dtypes = old_info.dtype.split("+")
    if choice.dtype in dtypes:
        return (old_info.dtype, old_info.dtype_reason)
    return ("+".join([*dtypes, choice.dtype]), f"{old_info.dtype_reason}; photos added in {choice}")


def _vector_index(output: Path, total: int, dim: int, old_info: IndexInfo | None) -> VectorIndex:
    """Add to the old index when the collection still calls for its kind; else build the chosen kind anew."""
    vectors = np.load(output / VECTORS_FILE, mmap_mode="r")
    plan = choose_plan(total, dim)
    if old_info is not None and old_info.plan.kind == plan.kind == "ivfpq":
        # The cells and codebooks trained on the first photos still fit new ones of the same kind: add them, and
        # tune the search again for the larger collection
        old = read_faiss(output)
        return VectorIndex(old, vectors, old_info.plan).extended(vectors[old_info.count :]).tuned()
    return build_index(vectors, plan)
