"""Which photos a ``birder-predict`` job classifies: its inputs or a manifest, and its shard of them.

- A *manifest* lists the photos, one path per line (a text file: relative paths are relative to the manifest's
  folder, blank lines and ``#`` comments are ignored, white space around a path is dropped), or as the ``path``
  column of a Parquet file. Its order is the order of the results. A path listed twice is classified once, at its
  first place.
- A *shard* ``K/N`` is the K-th of N contiguous blocks of that list (of the manifest's rows, or of the photos found
  under the inputs): block K holds rows ``floor((K-1)*M/N)`` up to ``floor(K*M/N)``, so the N blocks are disjoint,
  cover every row once and differ in size by one photo at most. Contiguous blocks rather than every N-th photo:
  each shard's tables are then a stretch of the manifest in its order, and merging the shards
  (``python -m birder.tools merge-results``) is a concatenation that streams, with no photo-to-place map. A
  photo takes the same work wherever it sits in the list, so equal counts are equal work; runs of slow photos
  (a folder of huge files on a slow disk) are balanced by shuffling the manifest, not by striding.

What identifies the list (the manifest's sha256, or the hash of the photos found) and the shard go into the run's
settings (:func:`birder.io.journal.prepare_run`): a resume with another list or shard is refused, and the merge
refuses shards of different lists. Every job reads the whole manifest (about 150 bytes of memory per row) to find
its block; the photos themselves are opened only when classified.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from birder.errors import BirderError, one_line
from birder.inference.dataset import discover_images
from birder.io.download import sha256_file
from birder.io.table_files import PATH_COLUMN, read_table_header_and_paths

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


# ---------------------------------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhotoBlock:
    """Block ``index`` (1-based) of ``count`` contiguous blocks of a photo list."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def bounds(self, total: int) -> tuple[int, int]:
        """``(start, stop)``: the rows of a list of ``total`` photos this shard takes (``stop`` excluded)."""
        return ((self.index - 1) * total // self.count, self.index * total // self.count)


WHOLE = PhotoBlock(1, 1)


def parse_shard(value: str | PhotoBlock | Sequence[int]) -> PhotoBlock:
    """``"K/N"`` (or ``(K, N)``) as a :class:`PhotoBlock`; anything else, or not ``1 <= K <= N``:
    :class:`BirderError`."""
    if isinstance(value, PhotoBlock):
        return value
    if isinstance(value, str):
        match = _SHARD.match(value)
        numbers = (int(match[1]), int(match[2])) if match else None
    else:
        numbers = tuple(value) if len(value) == 2 and all(isinstance(v, int) for v in value) else None
    if numbers is None or not 1 <= numbers[0] <= numbers[1]:
        shown = value if isinstance(value, str) else "/".join(str(v) for v in value)
        raise BirderError(f"--shard takes K/N with 1 <= K <= N (e.g. 2/3), got '{shown}'")
    return PhotoBlock(*numbers)


# ---------------------------------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """A manifest file's photo paths as written (``entries``, repeats dropped), and what identifies the file."""

    path: Path  # absolute
    sha256: str  # of the file's bytes
    entries: list[str]
    repeated: int = 0  # rows dropped because their path came earlier

    def photo(self, entry: str, folder: str | os.PathLike | None = None) -> str:
        """The photo an entry names: relative entries are relative to ``folder`` (default: the manifest's). Spelled
        without ``..`` (``lists/../photos/a.jpg`` is ``photos/a.jpg``), as results tables should say it."""
        return os.path.normpath(os.path.join(os.fspath(folder if folder is not None else self.path.parent), entry))

    def settings(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256, "photos": len(self.entries)}


def read_manifest(path: str | os.PathLike) -> Manifest:
    """The photo paths of a manifest: a text file (one per line) or a Parquet file (its ``path`` column).

    Raises:
        BirderError: the file is missing or unreadable, a Parquet file has no ``path`` column, or it names no photo.
    """
    path = Path(os.path.abspath(path))
    if not path.is_file():
        raise BirderError(f"manifest '{path}' does not exist")

    try:
        sha256 = sha256_file(path)
        rows = _parquet_entries(path) if path.suffix.lower() == ".parquet" else _text_entries(path)
        # dict keeps the first place of each path, in order
        unique = dict.fromkeys(rows)
    except OSError as exc:
        raise BirderError(f"cannot read manifest '{path}': {one_line(exc)}") from None
    except ValueError as exc:  # pyarrow's ArrowInvalid: a .parquet file that is not Parquet
        raise BirderError(f"cannot read manifest '{path}' as Parquet: {one_line(exc)}") from None

    entries = list(unique)
    if not entries:
        raise BirderError(f"manifest '{path}' lists no photos")
    return Manifest(path, sha256, entries, repeated=len(rows) - len(entries))


def _text_entries(path: Path) -> list[str]:
    entries = []
    # surrogateescape: a path that is not valid UTF-8 (possible on Linux) still names its file
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        for line in handle:
            text = line.strip()
            if text and not text.startswith("#"):
                entries.append(text)
    return entries


def _parquet_entries(path: Path) -> list[str]:
    (header, paths) = read_table_header_and_paths(path)  # the column is read when iterated, after this check
    if PATH_COLUMN not in header:
        raise BirderError(f"manifest '{path}' has no '{PATH_COLUMN}' column (it has: {', '.join(header)})")
    return [value for value in paths if value]  # nulls and empty strings are blank rows


def photo_list_sha256(paths: Iterable[str]) -> str:
    """What identifies a list of photos found under the inputs: the hash of their absolute paths, in order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.abspath(path).encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# A job's photos
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhotoSelection:
    """The photos of one job, in order, and what its run.json records about them."""

    paths: list[str]
    settings: dict[str, Any] = field(default_factory=dict)  # must match on resume (birder.io.journal.prepare_run)
    run_info: dict[str, Any] = field(default_factory=dict)  # written at the end, for merge-results


def select_photos(
    inputs: Sequence[str | os.PathLike], manifest: str | os.PathLike | None, shard: PhotoBlock | None, prog: str
) -> PhotoSelection:
    """(rank 0) The photos of a job: found under ``inputs`` or listed in ``manifest``, then ``shard``'s block.

    Without a manifest or a shard, nothing is added to the settings, so such runs (and resumes of older ones) are
    what they were. Says on stderr which block a shard takes and how many repeated rows a manifest had.
    """
    if manifest is not None:
        listed = read_manifest(manifest)
        if listed.repeated:
            repeats = f"{listed.repeated} repeated path(s) in {listed.path}, each classified once"
            print(f"{prog}: warning: {repeats}", file=sys.stderr)
        total = len(listed.entries)
        (start, stop) = (shard or WHOLE).bounds(total)
        paths = [listed.photo(entry) for entry in listed.entries[start:stop]]
        settings: dict[str, Any] = {"manifest": listed.settings()}
        run_info: dict[str, Any] = {}
        source = f"in {listed.path}"
    else:
        found = [str(path) for path in discover_images(inputs)]
        if shard is None:
            return PhotoSelection(found)
        total = len(found)
        (start, stop) = shard.bounds(total)
        paths = found[start:stop]
        # The list found is the shards' common ground: new photos in a folder would shift every block's bounds
        settings = {"inputs": {"sha256": photo_list_sha256(found), "photos": len(found)}}
        # What merge-results needs to find the list again and name the photos no shard classified
        run_info = {"inputs": [os.path.abspath(item) for item in inputs], "cwd": os.getcwd()}
        source = "found"

    if shard is not None:
        settings["shard"] = str(shard)
        run_info["shard_rows"] = [start, stop]
        taken = {0: "no photo (fewer photos than shards)", 1: f"photo {stop}"}.get(
            stop - start, f"photos {start + 1}-{stop}"
        )
        print(f"PhotoBlock {shard}: {taken} of the {total} {source}", file=sys.stderr)
    return PhotoSelection(paths, settings, run_info)
