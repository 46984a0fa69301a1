"""One rule for what a command writes: never onto its own inputs, never into another run's results.

Every command that writes goes through this module, so the rule and its messages are the same everywhere:

- **Never onto an input.** A file a command writes, replaces or deletes is refused when it is one of the command's
  inputs: the same file once links are resolved (another spelling, a symbolic link, a hard link). Callers pass
  an input folder's own files (an index folder's ``index.json``), not the folder.
- **A file output** (``-o FILE``) that exists is refused unless ``overwrite`` (:func:`check_output_file`).
- **A folder output** (``--output-dir DIR``, :class:`OutputFolder`): the files a command writes there are named by
  patterns (``results.csv``, ``.partial/*``). A folder that holds any of them, another run's results, is refused
  unless ``resume`` (the command then checks that the earlier run had the same settings) or ``overwrite``, which
  deletes the earlier run's files and only those: what the folder's manifest (:data:`MANIFEST_FILE`, written when
  a run starts and completed when it ends) records and what matches the patterns. Anything else in the folder is
  the user's and stays.
- **A training run** (:func:`check_training_folder`): a folder that holds checkpoints is refused unless
  ``resume``.
- **Images never among the photos read** (:func:`check_outside_photos`): crops, drawings and overlays are refused
  in a folder of the photos a command reads (or one below it), where the next run over those photos would take
  them for photos.

A refusal is a :class:`~birder.errors.BirderError` (exit code 2) of one line naming the path and what to do.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from birder.errors import BirderError
from birder.io.atomic import atomic_write_text

MANIFEST_FILE = ".birder-outputs.json"
MANIFEST_FORMAT = "birder-outputs"
MANIFEST_VERSION = 1
# What a training run leaves that another run must not replace: model and state files, FSDP state folders
CHECKPOINT_PATTERNS = ("*.pt", "*.dcp")
_SHOWN = 3  # files named in a message

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------------------------------------------------
# Never onto an input
# ---------------------------------------------------------------------------------------------------------------------


def same_file(first: PathLike, second: PathLike) -> bool:
    """Whether two paths name one file: the same path once symbolic links and ``..`` are resolved, or (both
    existing) the same device and inode, as two hard links of one file are."""
    if os.path.realpath(first) == os.path.realpath(second):
        return True
    try:
        return os.path.samefile(first, second)
    except (OSError, ValueError):  # one of them does not exist (then they are not one file), or a bad name
        return False


class InputFiles:
    """The files a command reads, to tell whether a path is one of them: by device and inode, so another
    spelling, a symbolic link and a hard link of an input all count. Looked at only once an output that exists
    has to be compared (a photo collection can be long)."""

    def __init__(self, paths: Iterable[PathLike | None]) -> None:
        self._paths = paths
        self._by_id: dict[tuple[int, int], PathLike] | None = None

    def find(self, path: PathLike) -> PathLike | None:
        """The input that ``path`` is (None: none, or nothing at ``path``)."""
        try:
            status = os.stat(path)
        except (OSError, ValueError):
            return None  # nothing there (or a link to nothing): no input can be lost
        if self._by_id is None:
            self._by_id = {}
            for candidate in self._paths:
                try:
                    found = os.stat(candidate) if candidate is not None else None
                except (OSError, ValueError):
                    continue
                if found is not None:
                    self._by_id.setdefault((found.st_dev, found.st_ino), candidate)
        return self._by_id.get((status.st_dev, status.st_ino))


def check_not_input(path: PathLike, inputs: Iterable[PathLike | None] | InputFiles, option: str) -> None:
    """Refuse to write (or delete) ``path``, given as ``option``, when it is one of ``inputs``."""
    known = inputs if isinstance(inputs, InputFiles) else InputFiles(inputs)
    found = known.find(path)
    if found is not None:
        alias = "" if _same_spelling(found, path) else f" ('{found}')"
        raise BirderError(
            f"{option} '{path}' is one of this command's inputs{alias}: the output must be a new file, never an "
            "input; choose another path"
        )


def _same_spelling(first: PathLike, second: PathLike) -> bool:
    return os.path.abspath(first) == os.path.abspath(second)


def folders_of(photos: Iterable[PathLike]) -> list[str]:
    """The folders of listed photos (absolute, each once, sorted), for :func:`check_outside_photos` where the photos
    come from a list (a manifest, an index, a results folder) and need not still be there."""
    return sorted({os.path.dirname(os.path.abspath(photo)) for photo in photos})


def check_outside_photos(path: PathLike, photo_inputs: Iterable[PathLike | None], option: str) -> None:
    """Refuse ``path``, a folder (or file) where a command writes images, given as ``option``, when it is a folder
    of the photos the command reads or lies below one: photo discovery (:func:`birder.io.images.find_images`) is
    recursive, so the next run over those photos would read the crops or drawings as photos. ``photo_inputs`` are
    the photo folders and files as given (a file stands for its folder). A hidden folder on the way
    (``photos/.crops``) is allowed: photo discovery never enters one."""
    target = Path(os.path.realpath(path))
    folders: dict[str, PathLike] = {}  # each folder once: a shell's glob can give thousands of photos of one
    for given in photo_inputs:
        if given is None:
            continue
        if os.path.isdir(given):
            folders.setdefault(os.path.abspath(given), given)
        elif os.path.isfile(given):  # (nothing there: the command reports it as a missing input)
            folders.setdefault(os.path.dirname(os.path.abspath(given)), given)
    for folder, given in folders.items():
        root = Path(os.path.realpath(folder))
        if target != root and root not in target.parents:
            continue
        if any(part.startswith(".") for part in target.relative_to(root).parts):
            continue
        where = "is" if target == root else "is inside"
        raise BirderError(
            f"{option} '{path}' {where} the folder of the photos being read ('{given}'): the images written there "
            "would be read as photos by the next run over them; choose a folder outside it"
        )


# ---------------------------------------------------------------------------------------------------------------------
# File outputs
# ---------------------------------------------------------------------------------------------------------------------


def check_output_file(
    path: PathLike, *, inputs: Iterable[PathLike | None] = (), overwrite: bool = False, option: str = "-o"
) -> Path:
    """``path`` as a file a command may write: not one of its ``inputs``, not a folder, and new unless
    ``overwrite``. Nothing is written or deleted here."""
    path = Path(path)
    check_not_input(path, inputs, option)
    if path.is_dir():
        raise BirderError(f"{option} '{path}' is a folder: give the name of a file to write")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise BirderError(f"{option} '{path}' already exists: add --overwrite to replace it, or choose another name")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Folder outputs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputFolder:
    """A folder a command writes into, and which of its files are the command's.

    ``patterns`` name those files relative to the folder (``fnmatch`` patterns on ``/``-separated paths; a path in
    a sub-folder names it literally first: ``.partial/*``, ``features/*.safetensors``). ``record``: keep the
    manifest of the files written in the folder (off where a file of our own would be out of place, e.g. in a
    Camtrap DP package). ``can_resume``: the command has ``--resume`` (its messages say so).
    """

    folder: Path
    command: str
    patterns: tuple[str, ...]
    option: str = "--output-dir"
    record: bool = True
    can_resume: bool = True

    def earlier_files(self) -> list[str]:
        """The files of an earlier run in the folder (relative, sorted): those the manifest records and those
        matching the patterns (this command's and the manifest's)."""
        manifest = read_manifest(self.folder)
        patterns = set(self.patterns)
        recorded: set[str] = set()
        if manifest is not None:
            patterns.update(manifest["patterns"])
            recorded = {name for name in manifest["files"] if _lexists(self.folder / name)}
        return sorted(recorded | _matching_files(self.folder, patterns))

    def check(
        self, *, inputs: Iterable[PathLike | None] = (), resume: bool = False, overwrite: bool = False
    ) -> list[str]:
        """Refuse, in one line, what the rule forbids (see the module's docstring); returns the earlier run's files.
        Nothing is written or deleted here: every rank of a run may call it."""
        if resume and overwrite:
            raise BirderError("--resume continues the earlier run and --overwrite replaces it: give one of them")
        if self.folder.exists() and not self.folder.is_dir():
            raise BirderError(f"{self.option} '{self.folder}' is a file: give a folder to write into")
        earlier = self.earlier_files()
        known = InputFiles(inputs)
        for name in earlier:
            check_not_input(self.folder / name, known, self.option)
        if not earlier:
            return earlier

        manifest = read_manifest(self.folder)
        if manifest is not None and manifest.get("released") and manifest["command"] == self.command:
            return earlier  # an attempt that produced no results (see release): the next run replaces what it left
        if resume and self.can_resume:
            other = manifest["command"] if manifest is not None else self.command
            if other != self.command:
                raise BirderError(
                    f"cannot --resume in {self.option} '{self.folder}': it holds the results of {other}, not of "
                    f"{self.command}; choose another folder"
                )
            return earlier
        if not overwrite:
            by = f"an earlier {manifest['command']} run" if manifest is not None else "an earlier run"
            todo = "add --resume to continue it or --overwrite to replace it" if self.can_resume else "add --overwrite"
            raise BirderError(
                f"{self.option} '{self.folder}' already holds the results of {by} ({_shown(earlier)}): {todo}, "
                "or choose another folder"
            )
        return earlier

    def claim(
        self, *, inputs: Iterable[PathLike | None] = (), resume: bool = False, overwrite: bool = False
    ) -> OutputFolder:
        """:meth:`check`, then get the folder ready (once, on the process that writes): with ``overwrite`` the
        earlier run's files are deleted (and only those); the manifest says this command writes here now."""
        earlier = self.check(inputs=inputs, resume=resume, overwrite=overwrite)
        manifest = read_manifest(self.folder)
        released = manifest is not None and manifest.get("released") and manifest["command"] == self.command
        kept: list[str] = []
        if earlier and (overwrite or released):
            remove_files(self.folder, earlier)
        elif earlier:  # a resume: the earlier files stay this run's
            kept = earlier
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.record:
            self._write_manifest(kept, complete=False)
        return self

    def finish(self) -> None:
        """Record the files the run wrote (call it once the run's last file is in place)."""
        if self.record:
            self._write_manifest(self.earlier_files(), complete=True)

    def release(self) -> None:
        """The run ends without results (e.g. no photo could be read): what it leaves (the list of what failed) is
        for the user to read, not a result to protect, so the same command may run here again without flags."""
        if self.record:
            self._write_manifest(self.earlier_files(), complete=False, released=True)

    def _write_manifest(self, files: Sequence[str], *, complete: bool, released: bool = False) -> None:
        manifest = read_manifest(self.folder)
        patterns = set(self.patterns) | (set(manifest["patterns"]) if manifest is not None else set())
        content = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "command": self.command,
            "complete": complete,
            "released": released,
            "patterns": sorted(patterns),
            "files": sorted(files),
        }
        atomic_write_text(self.folder / MANIFEST_FILE, json.dumps(content, indent=1) + "\n")


def prepare_output_folder(
    folder: PathLike,
    command: str,
    patterns: Iterable[str],
    *,
    inputs: Iterable[PathLike | None] = (),
    resume: bool = False,
    overwrite: bool = False,
    option: str = "--output-dir",
    record: bool = True,
    can_resume: bool = True,
) -> OutputFolder:
    """:meth:`OutputFolder.claim` of a new :class:`OutputFolder`: the folder, ready for ``command`` to write."""
    output = OutputFolder(Path(folder), command, tuple(patterns), option, record, can_resume)
    return output.claim(inputs=inputs, resume=resume, overwrite=overwrite)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest, or None (none, unreadable, or naming paths outside the folder: ignored)."""
    try:
        content = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(content, dict) or content.get("format") != MANIFEST_FORMAT:
        return None
    (patterns, files) = (content.get("patterns"), content.get("files"))
    names = [*(patterns or []), *(files or [])]
    if not isinstance(patterns, list) or not isinstance(files, list) or not all(map(_inside, names)):
        return None
    return {
        "command": str(content.get("command", "another command")),
        "patterns": patterns,
        "files": files,
        "released": content.get("released") is True,
    }


def remove_files(folder: Path, names: Iterable[str]) -> None:
    """Delete ``names`` (relative to ``folder``), then the sub-folders that held them once empty."""
    parents: set[Path] = set()
    for name in names:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            continue  # a pattern only ever names files; a folder of that name is someone else's
        path.unlink(missing_ok=True)
        parents.update(parent for parent in path.parents if folder in parent.parents)
    for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty: something else lives there
            parent.rmdir()


def _inside(name: object) -> bool:
    """A relative path that stays inside its folder (no ``..``, not absolute)."""
    if not isinstance(name, str) or not name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts and "\\" not in name


def _lexists(path: Path) -> bool:
    return path.is_symlink() or path.is_file()


def _matching_files(folder: Path, patterns: Iterable[str]) -> set[str]:
    """Files (and links) under ``folder`` whose ``/``-separated relative path matches one of ``patterns``; only
    the folder's own entries and the sub-folders a pattern names are looked at."""
    if not folder.is_dir():
        return set()
    (top, nested) = (set(), set())
    for pattern in patterns:
        (nested if "/" in pattern else top).add(pattern)
    found: set[str] = set()
    if top:
        with os.scandir(folder) as entries:
            for entry in entries:
                is_file = entry.is_symlink() or entry.is_file(follow_symlinks=False)
                if is_file and entry.name != MANIFEST_FILE and _matches(entry.name, top):
                    found.add(entry.name)
    for sub in {pattern.split("/", 1)[0] for pattern in nested}:
        start = folder / sub
        if start.is_symlink() or not start.is_dir():
            continue
        for root, _dirs, files in os.walk(start):  # links to folders are not followed
            for file in files:
                relative = (Path(root) / file).relative_to(folder).as_posix()
                if _matches(relative, nested):
                    found.add(relative)
    return found


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


# ---------------------------------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------------------------------


def checkpoints_in(folder: PathLike) -> list[str]:
    """The checkpoints (model and state files, FSDP state folders) directly in ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(entry.name for entry in folder.iterdir() if _matches(entry.name, CHECKPOINT_PATTERNS))


def check_training_folder(folder: PathLike, resume: object, image_folders: Iterable[PathLike | None] = ()) -> None:
    """Refuse to start a training run (``resume`` None) in a folder that holds checkpoints: the new run's
    ``<name>_<epoch>.pt`` and ``*_states.pt`` would replace them; and any run in or below ``image_folders``, the
    folders it reads its images from, where its pictures (confusion matrix, reconstructions) would be read as
    training images (an ImageFolder class of their own) by the next run."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise BirderError(f"--output-dir '{folder}' is a file: give a folder to write into")
    check_outside_photos(folder, image_folders, "--output-dir")
    found = checkpoints_in(folder)
    if resume is None and found:
        raise BirderError(
            f"--output-dir '{folder}' already holds checkpoints of an earlier run ({_shown(found)}): add --resume "
            "to continue it, or choose another --output-dir"
        )


def refuse_unrelated_checkpoints(folder: PathLike, stem: str) -> None:
    """``--resume`` found no training state of ``stem`` to continue: refuse to start afresh beside the
    checkpoints the folder holds (of another network, or models without their states)."""
    found = checkpoints_in(folder)
    if found:
        raise BirderError(
            f"--resume: '{folder}' holds no training state of {stem} to continue, but other checkpoints "
            f"({_shown(found)}): choose another --output-dir"
        )


def _shown(names: Sequence[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (", ..." if len(names) > _SHOWN else "")
