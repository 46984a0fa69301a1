"""Downloading and verifying pretrained model files.

A download is streamed into ``<dst>.partial`` and hashed on the way; only a complete file whose sha256 matches is
moved into place (atomically), so a crash, a broken connection or Ctrl-C never leaves a half file where a model is
expected. Verified hashes are remembered in a small stamp file next to each model, so a 1.2 GB file is hashed once,
not on every load.
"""

import contextlib
import hashlib
import http.client
import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tqdm import tqdm

from birder.conf import LEGACY_MODELS_DIR, models_dir
from birder.errors import BirderError, ChecksumMismatchError, DownloadError, one_line
from birder.io.atomic import atomic_write_path
from birder.version import __version__

logger = logging.getLogger("birder.download")

CHUNK_SIZE = 1 << 20
PARTIAL_SUFFIX = ".partial"
STAMP_SUFFIX = ".sha256.json"


def sha256_file(path: str | os.PathLike, chunk_size: int = CHUNK_SIZE) -> str:
    """The hex sha256 of a file, read in chunks so large models do not need to fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)

    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Hash stamps
# ---------------------------------------------------------------------------------------------------------------------


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + STAMP_SUFFIX)


def _read_stamp(path: Path) -> dict[str, Any] | None:
    try:
        with open(_stamp_path(path), encoding="utf-8") as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        return None  # no stamp, or a damaged one: both just mean "hash the file"

    return stamp if isinstance(stamp, dict) else None


def _stamped_sha256(path: Path, stat: os.stat_result) -> str | None:
    """The sha256 in ``path``'s stamp, if the stamp still describes the file as ``stat`` sees it."""
    stamp = _read_stamp(path)
    if stamp is None or stamp.get("size") != stat.st_size or stamp.get("mtime_ns") != stat.st_mtime_ns:
        return None

    sha256 = stamp.get("sha256")
    if not isinstance(sha256, str) or len(sha256) != 64:
        return None

    return sha256.lower()


def _write_stamp(path: Path, sha256: str, stat: os.stat_result | None = None) -> None:
    """Record ``sha256`` for ``path`` as it is (or was, at ``stat``); best effort, failures are only logged.

    Written atomically, so a reader never sees half a stamp.
    """
    stamp_path = _stamp_path(path)
    try:
        if stat is None:
            stat = path.stat()

        stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
        with atomic_write_path(stamp_path) as tmp_path:
            tmp_path.write_text(json.dumps(stamp), encoding="utf-8")
    except OSError as exc:
        # A read-only directory (e.g. a shared ./models) is fine: we just hash again next time
        logger.debug("Could not write hash stamp %s: %s", stamp_path, exc)


def verified_sha256(path: Path) -> str:
    """The sha256 of ``path``, taken from its stamp file when the stamp still fits the file's size and mtime.

    Otherwise the file is hashed and the stamp rewritten. The stat is taken before hashing, so a file that changes
    while it is being hashed gets a stamp that no longer fits it, and is hashed again next time.
    """
    path = Path(path)
    stat = path.stat()
    stamped = _stamped_sha256(path, stat)
    if stamped is not None:
        return stamped

    sha256 = sha256_file(path)
    _write_stamp(path, sha256, stat)
    return sha256


# ---------------------------------------------------------------------------------------------------------------------
# Downloading
# ---------------------------------------------------------------------------------------------------------------------


def _remove_quietly(path: Path) -> None:
    # Used during cleanup, where a second error must not hide the first one
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def _open(url: str, dst: Path, timeout: float) -> http.client.HTTPResponse:
    """Send the request; turn each way it can fail into a one-line ``DownloadError``."""
    request = urllib.request.Request(url, headers={"User-Agent": f"birder/{__version__}"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise DownloadError(f"Download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if not isinstance(reason, OSError):  # e.g. "unknown url type": a bad URL, not a network problem
            raise DownloadError(f"Cannot download {url}: {one_line(reason)}") from exc

        # Refused, unresolvable, timed out: the same advice works for all of them
        raise DownloadError(
            f"Cannot download {url} ({one_line(reason)}): this machine seems offline. "
            f"Download the file by hand and place it at {dst.absolute()}"
        ) from exc


def _content_length(response: http.client.HTTPResponse) -> int | None:
    value = response.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _stream_to_file(response: http.client.HTTPResponse, url: str, partial: Path, progress_bar: bool) -> str:
    """Copy the body into ``partial``, hashing as it goes; return the hex sha256 of a complete body."""
    total = _content_length(response)
    digest = hashlib.sha256()
    received = 0
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=partial.name.removesuffix(PARTIAL_SUFFIX),
        disable=not progress_bar,
    )
    with open(partial, "wb") as f, bar:
        while True:
            try:
                chunk = response.read(CHUNK_SIZE)
            except (OSError, http.client.HTTPException) as exc:
                raise DownloadError(
                    f"Connection to {url} broke after {received} of {total or 'unknown'} bytes: {one_line(exc)}"
                ) from exc

            if not chunk:
                break

            f.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))

        # http.client returns an empty read, not an error, when the server closes early
        if total is not None and received != total:
            raise DownloadError(f"Download of {url} ended after {received} of {total} bytes (connection closed)")

        # The data must be on disk before the rename makes it look like a finished file
        f.flush()
        os.fsync(f.fileno())

    return digest.hexdigest()


def _check_digest(url: str, got: str, expected: str | None) -> None:
    if expected is None:
        return

    expected = expected.strip().lower()
    if got != expected:
        raise ChecksumMismatchError(f"Checksum mismatch for {url}: expected sha256 {expected}, got {got}")


def download_file(
    url: str, dst: Path, expected_sha256: str | None = None, *, progress_bar: bool = True, timeout: float = 60.0
) -> Path:
    """Download ``url`` to ``dst`` atomically, verifying ``expected_sha256`` when given.

    Raises ``DownloadError`` (HTTP error, offline, interrupted transfer) or ``ChecksumMismatchError``; in every
    failure no file is left at ``dst`` or ``dst.partial``. An existing ``dst`` is only replaced by a verified file.
    """
    dst = Path(dst)
    partial = dst.with_name(dst.name + PARTIAL_SUFFIX)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with _open(url, dst, timeout) as response:
            sha256 = _stream_to_file(response, url, partial, progress_bar)

        _check_digest(url, sha256, expected_sha256)
        os.replace(partial, dst)
    except BaseException as exc:
        _remove_quietly(partial)
        if isinstance(exc, BirderError) or not isinstance(exc, Exception):
            raise  # our own one-line errors, and KeyboardInterrupt / SystemExit, pass through unchanged

        raise DownloadError(f"Download of {url} to {dst.absolute()} failed: {one_line(exc)}") from exc

    _write_stamp(dst, sha256)
    return dst


# ---------------------------------------------------------------------------------------------------------------------
# Pretrained model files
# ---------------------------------------------------------------------------------------------------------------------


def _expected_sha256(name: str, metadata: dict, file_format: str) -> str:
    formats = metadata.get("formats") or {}
    if file_format not in formats:
        available = ", ".join(sorted(formats)) or "none"
        raise DownloadError(f"Pretrained model {name!r} has no {file_format!r} file; available formats: {available}")

    return str(formats[file_format]["sha256"]).strip().lower()


def _find_verified(candidates: list[Path], expected: str) -> tuple[Path | None, tuple[Path, str] | None]:
    """The first candidate whose hash is ``expected``, and the first (path, hash) found with a wrong hash."""
    mismatch: tuple[Path, str] | None = None
    for candidate in candidates:
        if not candidate.is_file():
            continue

        got = verified_sha256(candidate)
        if got == expected:
            return candidate, mismatch

        logger.warning("%s has sha256 %s, expected %s; ignoring it", candidate, got, expected)
        if mismatch is None:
            mismatch = (candidate, got)

    return None, mismatch


def fetch_pretrained_file(
    name: str,
    metadata: dict,
    file_format: str = "pt",
    *,
    dst: Path | None = None,
    progress_bar: bool = True,
    force: bool = False,
) -> Path:
    """The local path of pretrained model ``name`` in ``file_format``, downloading it only when needed.

    ``force`` downloads anew even when a verified copy exists (the old file is replaced only by a verified one).

    With ``dst`` only that path is considered. Otherwise the cache (``models_dir()``) is tried first, then Birder's
    ``./models`` (read, never written). A file found with the manifest's sha256 is returned without any network
    request; a missing or damaged one is downloaded into the cache (or ``dst``).
    """
    expected = _expected_sha256(name, metadata, file_format)
    filename = f"{name}.{file_format}"
    target = Path(dst) if dst is not None else models_dir() / filename
    candidates = [target] if dst is not None else [target, LEGACY_MODELS_DIR / filename]

    (found, mismatch) = (None, None) if force else _find_verified(candidates, expected)
    if found is not None:
        logger.info("Using %s for pretrained model %s", found, name)
        return found

    base_url = metadata.get("url")
    if not base_url:
        if mismatch is not None:
            bad_path, got = mismatch
            raise ChecksumMismatchError(
                f"{bad_path} has sha256 {got}, expected {expected}, and the manifest gives no download URL for "
                f"{filename}; place a correct copy at {target.absolute()}"
            )

        raise DownloadError(
            f"Pretrained model file {filename} not found and the manifest gives no download URL; "
            f"place it at {target.absolute()}"
        )

    url = f"{base_url.rstrip('/')}/{filename}"
    size_mb = metadata["formats"][file_format].get("file_size")
    logger.info("Downloading %s (%s MB) to %s", url, size_mb if size_mb is not None else "?", target)
    try:
        download_file(url, target, expected, progress_bar=progress_bar)
    except ChecksumMismatchError:
        raise  # the fresh download itself is wrong: its message already names both hashes
    except DownloadError as exc:
        if mismatch is None:
            raise

        bad_path, got = mismatch
        raise ChecksumMismatchError(
            f"{bad_path} has sha256 {got}, expected {expected}, and downloading a new copy failed: {exc}"
        ) from exc

    logger.info("Downloaded pretrained model %s to %s", name, target)
    return target
