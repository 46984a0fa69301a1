"""``model-info``: what a model file holds (network, parameters, signature, rgb stats, classes), or what the
manifest says about a pretrained name (plus the file's contents once it is downloaded)."""

import argparse
import json
import os
from pathlib import Path
from typing import Any

from birder.errors import BirderError, UnknownModelError
from birder.io.checkpoint import (
    EXPORT_SUFFIXES,
    get_channels_from_signature,
    get_num_classes_from_signature,
    get_size_from_signature,
    is_export_file,
    names_by_index,
    read_checkpoint,
)
from birder.model_registry import registry
from birder.tools.list_models import cached_file

# Class names shown without --classes: enough to see what the names look like.
_CLASSES_SHOWN = 10


def add_parser(subparsers: Any, name: str) -> None:
    parser = subparsers.add_parser(name, help="show what a model file or pretrained name holds", description=__doc__)
    parser.add_argument("model", metavar="FILE_OR_NAME", help="a .pt/.safetensors file, or a pretrained model name")
    parser.add_argument("--network", help="network of a file that does not name it (display only)")
    parser.add_argument("--classes", action="store_true", help="list every class name")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def checkpoint_info(path: str | os.PathLike, network: str | None = None) -> dict[str, Any]:
    """The metadata of a model file and its parameter count (tensors are memory-mapped, not loaded)."""
    if is_export_file(path):
        from birder.io.export import read_export_metadata

        (metadata, parameters) = (read_export_metadata(path), None)
    else:
        (state, metadata) = read_checkpoint(path)
        parameters = sum(tensor.numel() for tensor in state.values())
        del state
    signature = metadata["signature"]
    class_to_idx = metadata["class_to_idx"]
    return {
        "file": str(path),
        "file_size_mb": round(Path(path).stat().st_size / 2**20, 1),
        "network": metadata.get("network") or network,
        "task": metadata.get("task"),
        "birder_version": metadata.get("birder_version"),
        "parameters": parameters,
        "input_channels": get_channels_from_signature(signature),
        "input_size": list(get_size_from_signature(signature)),
        "num_classes": get_num_classes_from_signature(signature),
        "signature": signature,
        "rgb_stats": {key: list(value) for key, value in metadata["rgb_stats"].items()},
        "config": metadata.get("config"),
        "classes": names_by_index(class_to_idx),
    }


def model_info(name_or_path: str, network: str | None = None) -> dict[str, Any]:
    """:func:`checkpoint_info` of a file, or the manifest entry of a pretrained name (and its cached file's info)."""
    if Path(name_or_path).is_file():
        return checkpoint_info(name_or_path, network)
    if not registry.pretrained_exists(name_or_path) and Path(name_or_path).suffix in (
        ".pt",
        ".safetensors",
        *EXPORT_SUFFIXES,
    ):
        raise BirderError(f"model file '{name_or_path}' does not exist")

    try:
        entry = registry.get_pretrained_metadata(name_or_path)
    except UnknownModelError as exc:  # keep its "did you mean" hint, but say a file was looked for too
        raise BirderError(f"'{name_or_path}' is not a model file, and {exc}") from None
    info: dict[str, Any] = {"pretrained": name_or_path, **entry, "cached": None}
    for file_format in entry["formats"]:
        path = cached_file(name_or_path, file_format)
        if path is not None:
            info["cached"] = path
            info["checkpoint"] = checkpoint_info(path, network or entry["net"]["network"])
            break
    return info


def _format_parameters(parameters: int | None) -> str:
    # Exports (.pts, .pt2, .onnx) are read for their metadata only; their weights are not counted.
    return f"{parameters:,}" if parameters is not None else "not counted for exports (see the source .pt file)"


def _format_checkpoint(info: dict[str, Any], all_classes: bool) -> list[str]:
    stats = info["rgb_stats"]
    classes = info["classes"]
    shown = classes if all_classes or len(classes) <= _CLASSES_SHOWN else classes[:_CLASSES_SHOWN]
    more = "" if len(shown) == len(classes) else f", ... (--classes lists all {len(classes)})"
    lines = [
        f"file:            {info['file']} ({info['file_size_mb']} MB)",
        f"network:         {info['network'] or '(not in the file; pass --network when loading)'}",
        f"task:            {info['task']}",
        f"birder version:  {info['birder_version']}",
        f"parameters:      {_format_parameters(info['parameters'])}",
        f"input:           {info['input_channels']} x {info['input_size'][0]} x {info['input_size'][1]}",
        f"signature:       {json.dumps(info['signature'])}",
        f"rgb stats:       mean {tuple(stats['mean'])}, std {tuple(stats['std'])}",
    ]
    if info["config"]:
        lines.append(f"config:          {json.dumps(info['config'])}")
    if all_classes:
        lines.append(f"classes ({len(classes)}):")
        lines += [f"  {index:>5}  {name}" for index, name in enumerate(classes)]
    else:
        lines.append(f"classes ({len(classes)}): {', '.join(shown)}{more}")
    return lines


def format_info(info: dict[str, Any], all_classes: bool = False) -> str:
    if "pretrained" not in info:
        return "\n".join(_format_checkpoint(info, all_classes))

    formats = ", ".join(
        f"{fmt} {details.get('file_size', '?')} MB sha256 {details['sha256']}"
        for fmt, details in info["formats"].items()
    )
    lines = [
        f"pretrained:      {info['pretrained']}",
        f"description:     {info.get('description', '')}",
        f"network / tag:   {info['net']['network']} / {info['net'].get('tag')}",
        f"resolution:      {'x'.join(str(v) for v in info.get('resolution', ()))}",
        f"task:            {info.get('task')}",
        f"url:             {info.get('url', '-')}",
        f"formats:         {formats}",
    ]
    if info["cached"] is None:
        lines.append(f"cached:          no (python -m birder.tools download-model {info['pretrained']})")
    else:
        lines.append(f"cached:          {info['cached']}")
        lines += ["", *_format_checkpoint(info["checkpoint"], all_classes)]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    info = model_info(args.model, args.network)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(format_info(info, args.classes))
    return 0
