"""Atomic file writes: a crash or Ctrl-C never leaves a half-written file under the final name."""

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def fsync_path(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_write_path(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dst``; on success it is flushed to disk and renamed onto ``dst``.

    The temporary file sits in the same directory so the final ``os.replace`` is a rename on one file system
    (atomic on POSIX and Windows). On any error the temporary file is removed and ``dst`` is left untouched.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    (fd, tmp_name) = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        yield tmp_path
        fsync_path(tmp_path)
        # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, dst)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise

    fsync_directory(dst.parent)


def atomic_write_text(dst: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``dst`` atomically; returns ``dst`` as a path."""
    with atomic_write_path(dst) as tmp_path:
        tmp_path.write_text(text, encoding="utf-8")
    return Path(dst)


def _umask() -> int:
    """The process umask, read without changing it (Linux); elsewhere the one read when this module was imported."""
    mask = _umask_from_proc()
    return mask if mask is not None else _UMASK_AT_IMPORT


def _umask_from_proc() -> int | None:
    """The umask as Linux (4.7 and later) shows it in /proc; None where it does not."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return None


def _umask_by_setting() -> int:
    # The portable way to read the umask is to set it and set it back: a file another thread creates in between
    # gets the wrong mode. So it is done once, at import (normally before a program starts threads), and with
    # the strictest mask, so such a file would be too private rather than world-writable.
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_from_proc()
if _UMASK_AT_IMPORT is None:
    _UMASK_AT_IMPORT = _umask_by_setting()


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new directory entry durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
