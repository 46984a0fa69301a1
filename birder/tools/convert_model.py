"""``convert-model``: rewrite a model file in another format (``.pt`` <-> ``.safetensors``; with the exporter
installed, also TorchScript ``.pts``, ``torch.export`` ``.pt2`` and ``.onnx``).

The model is loaded through the one checkpoint path (:func:`birder.load_model`), so a file in Birder's older
key layout comes out in the current one, with its metadata (signature, classes, rgb stats, config) kept.
"""

import argparse
from pathlib import Path
from typing import Any

from birder.errors import BirderError
from birder.io.checkpoint import CHECKPOINT_FORMATS, EXPORT_SUFFIXES
from birder.io.download import fetch_pretrained_file
from birder.io.outputs import check_output_file
from birder.loading import load_model, save_model
from birder.model_registry import registry
from birder.net.base import BaseNet


def add_parser(subparsers: Any, name: str) -> None:
    parser = subparsers.add_parser(name, help="convert a model file to another format", description=__doc__)
    parser.add_argument("src", metavar="SRC", help="a model file, or a pretrained model name")
    parser.add_argument("dst", metavar="DST", type=Path, help="the new file; its extension picks the format")
    parser.add_argument("--network", help="network of SRC when the file does not name it (e.g. vit_l16)")
    parser.add_argument(
        "--overwrite", "--force", dest="overwrite", action="store_true", help="replace DST if it exists (never SRC)"
    )


def _resolve_source(src: str, network: str | None) -> tuple[Path, str | None]:
    if Path(src).is_file():
        return (Path(src), network)
    if registry.pretrained_exists(src):
        metadata = registry.get_pretrained_metadata(src)
        return (fetch_pretrained_file(src, metadata, "pt"), network or metadata["net"]["network"])
    raise BirderError(f"'{src}' is neither a model file nor a pretrained model name")


def _export(net: BaseNet, dst: Path, model_info: Any) -> Path:
    try:
        from birder.io.export import export_model
    except ImportError:
        raise BirderError(f"cannot write {dst.suffix} files: this installation has no exporter") from None
    return Path(export_model(net, dst, model_info))


def convert_model(
    src: str, dst: str | Path, network: str | None = None, *, overwrite: bool = False, force: bool = False
) -> Path:
    """Convert model ``src`` (a file or a pretrained name) to ``dst``, the format following its extension; an
    existing ``dst`` is replaced only with ``overwrite`` (``force`` is its older name), and never when it is
    ``src`` itself."""
    dst = Path(dst)
    suffix = dst.suffix.lower()
    supported = [f".{fmt}" for fmt in CHECKPOINT_FORMATS] + list(EXPORT_SUFFIXES)
    if suffix not in supported:
        raise BirderError(f"cannot convert to '{dst.name}': the extension must be one of {', '.join(supported)}")
    check_output_file(dst, inputs=[src], overwrite=overwrite or force, option="DST")

    (path, network) = _resolve_source(src, network)
    check_output_file(dst, inputs=[path], overwrite=True, option="DST")  # the file a pretrained name resolved to
    # Read once; the file's task travels on the loaded network (net.task), so a MIM encoder stays one.
    (net, model_info) = load_model(path, network=network, inference=True)
    if suffix in EXPORT_SUFFIXES:
        return _export(net, dst, model_info)
    return save_model(net, dst, model_info)


def run(args: argparse.Namespace) -> int:
    path = convert_model(args.src, args.dst, args.network, overwrite=args.overwrite)
    print(path)
    return 0
