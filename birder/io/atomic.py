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
        os.chmod(tmp_path, 0o666 & ~_current_umask())
        os.replace(tmp_path, dst)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise

    fsync_directory(dst.parent)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
