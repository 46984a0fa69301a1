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
        os.replace(tmp_path, dst)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
