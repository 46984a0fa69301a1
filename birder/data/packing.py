"""Packing photos into WebDataset tar shards (``python -m birder.tools pack``), resumably.

Millions of small files choke shared file systems; a few hundred tars of about a gigabyte each stream well
(:mod:`birder.data.shards` reads them). Each photo is stored as its file's bytes (no re-encoding: the pixels the
model sees are the ones it would see from the folder), with its relative path and label beside it.

Every photo is decoded once while packing, with the package's one decoder: a photo that cannot be read is listed
in ``unreadable.csv`` and not packed, so training never meets it. A shard is written under a temporary name and
renamed when complete; ``index.json`` is rewritten (atomically) after each shard. An interrupted pack started again
with the same arguments continues after the last complete shard; other photos than before are refused.
"""

import concurrent.futures
import csv
import hashlib
import io
import json
import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm import tqdm

from birder.data.shards import INDEX_FILE, INDEX_FORMAT, INDEX_VERSION, SHARD_PATTERN, read_index
from birder.data.training import DataError, csv_files, image_folder_files, list_images
from birder.errors import ImageDecodeError, one_line
from birder.io.atomic import atomic_write_path, atomic_write_text
from birder.io.checkpoint import names_by_index
from birder.io.images import load_image_bytes
from birder.io.outputs import OutputFolder

logger = logging.getLogger(__name__)

UNREADABLE_FILE = "unreadable.csv"
PACK_COMMAND = "python -m birder.tools pack"
# What a packing writes in its folder (birder.io.outputs: --overwrite deletes these and nothing else)
PACK_OUTPUTS = (INDEX_FILE, SHARD_PATTERN.split("{")[0] + "*.tar", UNREADABLE_FILE)
LABELS_FROM_FOLDERS = "folders"
DEFAULT_SHARD_SIZE = 1 << 30
# Bytes a tar adds per member (a 512-byte header, padding to 512): counted so shards end near the size asked for.
_TAR_MEMBER_OVERHEAD = 1024
# One fixed member time: the same photos give byte-identical shards (a resumed pack equals an uninterrupted one).
_PACK_MTIME = 1_600_000_000.0
_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20}
_SIZE_UNITS |= {"g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """``1GB``, ``500MB``, ``64KiB`` or a number of bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise DataError(f"shard size '{text}': expected a size such as 1GB, 500MB or 64KiB")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if size < 1:
        raise DataError(f"shard size '{text}': must be more than 0 bytes")
    return size


@dataclass(frozen=True)
class PackSource:
    """The photos to pack, in packing order: paths, the name each is stored under, labels."""

    paths: list[Path]
    names: list[str]  # relative paths, stored with each sample
    targets: list[int] | None
    class_names: list[str] | None

    def fingerprint(self) -> str:
        """Identifies the photo list (names, labels, classes): a resumed pack must see the same."""
        digest = hashlib.sha256()
        for number, name in enumerate(self.names):
            digest.update(f"{name}\t{self.targets[number] if self.targets else ''}\n".encode())
        digest.update(json.dumps(self.class_names).encode())
        return digest.hexdigest()


def pack_source(photos: Sequence[str | Path], labels: str | Path | None = None) -> PackSource:
    """What to pack: the images under ``photos`` (unlabelled), or labelled by a CSV of ``path,label`` rows (paths
    relative to the CSV) or, with ``labels="folders"``, by an ImageFolder layout (``photos/<class>/<images>``)."""
    if labels is None:
        paths = list_images(photos)
        return PackSource(paths, [_relative(path, photos) for path in paths], None, None)
    if str(labels) == LABELS_FROM_FOLDERS:
        if len(photos) != 1:
            raise DataError("--labels folders takes one PHOTOS folder (its sub-folders are the classes)")
        files = image_folder_files(photos[0])
        names = [path.relative_to(photos[0]).as_posix() for path in files.paths]
    elif Path(labels).suffix.lower() in (".csv", ".tsv", ".txt") or Path(labels).is_file():
        files = csv_files(labels)
        names = [_relative(path, [Path(labels).parent]) for path in files.paths]
    else:
        raise DataError(f"--labels '{labels}': give a CSV file of path,label rows, or 'folders' for class sub-folders")

    class_names = names_by_index(files.class_to_idx)
    return PackSource(files.paths, names, list(files.targets), class_names)


def _relative(path: Path, roots: Sequence[str | Path]) -> str:
    for root in map(Path, roots):
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    return path.as_posix()


@dataclass
class PackReport:
    output_dir: Path
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (relative path, error)
    resumed_from: int = 0  # photos already packed by an earlier, interrupted run
    seconds: float = 0.0
    packed_now: int = 0  # photos read by this call

    @property
    def images_per_s(self) -> float:
        return self.packed_now / self.seconds if self.seconds > 0 else float("nan")


def pack(
    source: PackSource,
    output_dir: str | Path,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int = 0,
    progress_bar: bool = True,
    overwrite: bool = False,
) -> PackReport:
    """Write ``source`` into ``output_dir`` as shards of about ``shard_size`` bytes (see the module's notes).

    ``workers`` processes read and check the photos (0: this process). A folder that holds a packing of the same
    photos is continued; of others, refused unless ``overwrite``, which deletes that packing (its files only).
    """
    output_dir = Path(output_dir)
    # Continuing a packing of the same photos is the same command again (_resume_index checks which photos)
    folder = OutputFolder(output_dir, PACK_COMMAND, PACK_OUTPUTS, option="-o")
    folder.claim(resume=not overwrite, overwrite=overwrite)
    fingerprint = source.fingerprint()
    index = _resume_index(output_dir, source, fingerprint)
    report = PackReport(output_dir)
    done = index["shards"][-1]["end"] if index["shards"] else 0
    report.resumed_from = done
    for entry in index["shards"]:
        report.unreadable += [tuple(item) for item in entry["unreadable"]]
    if index["complete"]:
        logger.info("%s: already packed (%d photos in %d shards)", output_dir, index["samples"], len(index["shards"]))
        return _summarize(report, index, 0.0)
    if done:
        logger.info("%s: continuing an interrupted pack after %d of %d photos", output_dir, done, len(source.paths))

    started = time.perf_counter()
    bar = tqdm(
        total=len(source.paths), initial=done, desc="packing", unit="photo", disable=not progress_bar, leave=False
    )
    photos = _read_photos(source.paths[done:], source.names[done:], workers)
    position = done
    while position < len(source.paths):
        entry = {"name": SHARD_PATTERN.format(len(index["shards"])), "first": index["samples"], "unreadable": []}
        (samples, size) = (0, 0)
        with (
            atomic_write_path(output_dir / entry["name"]) as tmp_path,
            wds.TarWriter(str(tmp_path), encoder=False, mtime=_PACK_MTIME) as sink,
        ):
            while position < len(source.paths) and (samples == 0 or size < shard_size):
                (data, error) = next(photos)
                name = source.names[position]
                position += 1
                bar.update()
                if data is None:
                    entry["unreadable"].append([name, error])
                    continue
                sink.write(_sample(entry["first"] + samples, name, data, source, position - 1))
                samples += 1
                size += len(data) + 3 * _TAR_MEMBER_OVERHEAD
        entry |= {"samples": samples, "bytes": (output_dir / entry["name"]).stat().st_size, "end": position}
        if samples == 0:  # only unreadable photos were left: no empty shard, but remember them
            (output_dir / entry["name"]).unlink()
            if not index["shards"]:
                first = entry["unreadable"][0]
                raise DataError(f"none of the {len(source.paths)} photos could be read (first: {first[1]})")
            index["shards"][-1]["unreadable"] += entry["unreadable"]
            index["shards"][-1]["end"] = position
        else:
            index["shards"].append(entry)
            index["samples"] += samples
        report.unreadable += [tuple(item) for item in entry["unreadable"]]
        _write_index(output_dir, index)
    bar.close()

    index["complete"] = True
    _write_unreadable(output_dir, report.unreadable)
    _write_index(output_dir, index)
    folder.finish()
    report.packed_now = len(source.paths) - done
    return _summarize(report, index, time.perf_counter() - started)


def _summarize(report: PackReport, index: dict[str, Any], seconds: float) -> PackReport:
    report.shards = len(index["shards"])
    report.samples = index["samples"]
    report.bytes = sum(entry["bytes"] for entry in index["shards"])
    report.seconds = seconds
    return report


def _sample(sample_id: int, name: str, data: bytes, source: PackSource, position: int) -> dict[str, Any]:
    suffix = Path(name).suffix.lower().lstrip(".") or "jpg"
    meta: dict[str, Any] = {"path": name}
    sample: dict[str, Any] = {"__key__": f"{sample_id:09d}", suffix: data}
    if source.targets is not None and source.class_names is not None:
        target = source.targets[position]
        meta["label"] = source.class_names[target]
        sample["cls"] = str(target).encode()
    sample["json"] = json.dumps(meta, ensure_ascii=False).encode()
    return sample


def _resume_index(output_dir: Path, source: PackSource, fingerprint: str) -> dict[str, Any]:
    """The index to continue (an interrupted pack of the same photos), or a new one; refuses another packing."""
    index = read_index(output_dir)
    if index is None:
        leftovers = sorted(output_dir.glob("*.tar"))
        if leftovers:
            raise DataError(
                f"{output_dir}: holds .tar files but no {INDEX_FILE}: pack into an empty folder, or add --overwrite "
                "to replace the shards"
            )
        return {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "complete": False,
            "photos": len(source.paths),
            "fingerprint": fingerprint,
            "classes": source.class_names,
            "samples": 0,
            "shards": [],
        }

    if index.get("fingerprint") != fingerprint:
        raise DataError(
            f"{output_dir}: already holds a packing of other photos or labels ({index.get('photos')} photos); "
            "pack into a new folder, or add --overwrite to replace that packing"
        )
    for entry in index["shards"]:
        if not (output_dir / entry["name"]).is_file():
            raise DataError(
                f"{output_dir / entry['name']}: listed in {INDEX_FILE} but missing: pack again into a new folder"
            )
    return index


def _write_index(output_dir: Path, index: dict[str, Any]) -> None:
    atomic_write_text(output_dir / INDEX_FILE, json.dumps(index, indent=1, ensure_ascii=False) + "\n")


def _write_unreadable(output_dir: Path, unreadable: Sequence[tuple[str, str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "error"])
    writer.writerows(unreadable)
    atomic_write_text(output_dir / UNREADABLE_FILE, buffer.getvalue())


def _read_photos(paths: Sequence[Path], names: Sequence[str], workers: int) -> Iterator[tuple[bytes | None, str]]:
    """Each photo's bytes once decoded successfully, else None and the reason; in order, ``workers`` at a time."""
    if workers <= 0:
        yield from map(_read_checked, paths, names)
        return

    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        yield from pool.map(_read_checked, paths, names, chunksize=16)


def _read_checked(path: Path, name: str) -> tuple[bytes | None, str]:
    try:
        data = path.read_bytes()
    except OSError as err:
        return (None, f"cannot read '{name}': {one_line(err)}")
    try:
        load_image_bytes(data, name)
    except ImageDecodeError as err:
        return (None, str(err))
    return (data, "")
