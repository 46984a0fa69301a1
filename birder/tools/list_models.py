"""``list-models``: the networks birder can build, or (``--pretrained``) the models it can download."""

import argparse
from typing import Any

import torch

from birder.conf import LEGACY_MODELS_DIR, models_dir
from birder.model_registry import registry


def add_parser(subparsers: Any, name: str) -> None:
    parser = subparsers.add_parser(name, help="list networks or pretrained models", description=__doc__)
    parser.add_argument("--pretrained", action="store_true", help="pretrained models instead of networks")
    parser.add_argument("--filter", help="shell-style name pattern, e.g. 'vit_b*'")
    parser.add_argument("--verbose", "-v", action="store_true", help="more columns")


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart (numbers are pre-formatted by the caller)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in (header, *rows)
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def cached_file(name: str, file_format: str) -> str | None:
    """Where a pretrained file already sits (download cache, or Birder's ./models), unverified."""
    for folder in (models_dir(), LEGACY_MODELS_DIR):
        path = folder / f"{name}.{file_format}"
        if path.is_file():
            return str(path)
    return None


def pretrained_rows(pattern: str | None, verbose: bool) -> tuple[list[str], list[list[str]]]:
    header = ["name", "network", "size (MB)", "resolution", "task", "description"]
    if verbose:
        header += ["formats", "cached", "url"]
    rows = []
    for name in registry.list_pretrained_models(pattern):
        entry = registry.get_pretrained_metadata(name)
        formats = entry["formats"]
        first = next(iter(formats))
        resolution = "x".join(str(v) for v in entry.get("resolution", ())) or "-"
        row = [
            name,
            entry["net"]["network"],
            f"{formats[first].get('file_size', 0):.1f}",
            resolution,
            entry.get("task", ""),
            entry.get("description", ""),
        ]
        if verbose:
            cached = [path for path in (cached_file(name, fmt) for fmt in formats) if path]
            row += [",".join(formats), ",".join(cached) or "-", entry.get("url", "-")]
        rows.append(row)
    return (header, rows)


def network_rows(pattern: str | None, verbose: bool) -> tuple[list[str], list[list[str]]]:
    if not verbose:
        return (["network"], [[name] for name in registry.list_models(pattern)])

    header = ["network", "params (M)", "resolution", "layers", "heads", "width"]
    rows = []
    for name in registry.list_models(pattern):
        # On the meta device a ViT-H costs no memory and no time: only shapes are created
        with torch.device("meta"):
            net = registry.net_factory(name, num_classes=0)
        params = sum(param.numel() for param in net.parameters())
        config = net.config
        rows.append(
            [
                name,
                f"{params / 1e6:.1f}",
                "x".join(str(v) for v in net.size),
                str(config.get("num_layers", "-")),
                str(config.get("num_heads", "-")),
                str(config.get("hidden_dim", "-")),
            ]
        )
    return (header, rows)


def run(args: argparse.Namespace) -> int:
    lister = pretrained_rows if args.pretrained else network_rows
    (header, rows) = lister(args.filter, args.verbose)
    if not rows:
        kind = "pretrained models" if args.pretrained else "networks"
        print(f"no {kind} match '{args.filter}'" if args.filter else f"no {kind}")
        return 0
    if header == ["network"]:
        print("\n".join(row[0] for row in rows))
    else:
        print(format_table(header, rows))
    return 0
