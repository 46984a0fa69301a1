"""``download-model``: fetch a pretrained model file into the models directory, verified by sha256."""

import argparse
from pathlib import Path
from typing import Any

from birder.io.download import fetch_pretrained_file, verified_sha256
from birder.io.outputs import check_output_file
from birder.model_registry import registry


def add_parser(subparsers: Any, name: str) -> None:
    parser = subparsers.add_parser(name, help="download a pretrained model", description=__doc__)
    parser.add_argument("name", help="pretrained model name (see list-models --pretrained)")
    parser.add_argument("--format", default="pt", help="file format to fetch (pt, safetensors, ...)")
    parser.add_argument("--force", action="store_true", help="download again even if a verified file is present")
    parser.add_argument("--dst", type=Path, help="save to this path instead of the models directory")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --dst when it holds another file than this model"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def download_pretrained(
    name: str,
    file_format: str = "pt",
    *,
    force: bool = False,
    dst: Path | None = None,
    progress_bar: bool = True,
    overwrite: bool = False,
) -> Path:
    """The path of pretrained ``name`` after making sure a verified copy is there (``force``: fetch anew). A
    ``dst`` that holds another file is replaced only with ``overwrite`` or ``force``."""
    metadata = registry.get_pretrained_metadata(name)
    expected = str((metadata.get("formats") or {}).get(file_format, {}).get("sha256", "")).strip().lower()
    replaces = dst is not None and Path(dst).is_file() and not (overwrite or force)
    if replaces and verified_sha256(Path(dst)) != expected:
        check_output_file(dst, option="--dst")  # raises: it exists and is not this model
    return fetch_pretrained_file(name, metadata, file_format, dst=dst, progress_bar=progress_bar, force=force)


def run(args: argparse.Namespace) -> int:
    path = download_pretrained(
        args.name,
        args.format,
        force=args.force,
        dst=args.dst,
        progress_bar=not args.no_progress,
        overwrite=args.overwrite,
    )
    print(path)
    return 0
