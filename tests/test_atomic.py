"""Atomic writes (``birder.io.atomic``): results appear whole or not at all, with the permissions of a plain open()."""

import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from birder.io import atomic
from birder.io.atomic import atomic_write_path


@pytest.fixture
def umask_027() -> Iterator[int]:
    """A umask other than the usual 022, so that a mode that ignores it shows."""
    previous = os.umask(0o027)
    yield 0o027
    os.umask(previous)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_file_has_the_mode_a_plain_open_would_give(tmp_path: Path, umask_027: int) -> None:
    with atomic_write_path(tmp_path / "out" / "result.csv") as tmp:
        tmp.write_text("a,b\n")
    (tmp_path / "plain.csv").write_text("a,b\n")

    assert (tmp_path / "out" / "result.csv").read_text() == "a,b\n"
    assert mode_of(tmp_path / "out" / "result.csv") == 0o666 & ~umask_027 == mode_of(tmp_path / "plain.csv")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["result.csv"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "result.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")

    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["result.csv"]


def test_files_other_threads_create_during_a_write_keep_the_umask(
    tmp_path: Path, umask_027: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Deterministic stand-in for a race: whenever the process umask is changed during an atomic write, another
    # thread creates a file at that very moment. Its mode must be the one the umask gives, not 0o666.
    real_umask = os.umask
    modes: list[int] = []

    def create_elsewhere(index: int) -> None:
        path = tmp_path / "other" / f"{index}.txt"
        path.write_text("x")
        modes.append(mode_of(path))

    def umask_then_other_thread(mask: int) -> int:
        previous = real_umask(mask)
        thread = threading.Thread(target=create_elsewhere, args=(len(modes),))
        thread.start()
        thread.join()
        return previous

    (tmp_path / "other").mkdir()
    monkeypatch.setattr(atomic.os, "umask", umask_then_other_thread)
    for index in range(3):
        with atomic_write_path(tmp_path / f"{index}.bin") as tmp:
            tmp.write_bytes(b"data")
        create_elsewhere(len(modes))  # and between writes

    assert modes and all(mode == 0o666 & ~umask_027 for mode in modes), [oct(m) for m in modes]
