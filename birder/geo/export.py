"""Exports of a results folder for camera-trap and biodiversity platforms: one entry for the command line.

``birder-predict --export camtrap-dp|coco-ct`` (at the end of the run) and
``python -m birder.tools export RESULTS_DIR --export ...`` both call :func:`export_results`; :func:`check_export`
refuses missing options before a long run starts rather than after it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from birder.errors import BirderError
from birder.geo.camtrap import CamtrapOptions, ExportReport, export_camtrap_dp, parse_timezone, require_timezone
from birder.geo.coco import FILE_NAME as COCO_FILE
from birder.geo.coco import export_coco_ct
from birder.geo.results import read_results_folder

EXPORT_FORMATS = ("camtrap-dp", "coco-ct")
CAMTRAP_DIR = "camtrap-dp"


def check_export(formats: Sequence[str], options: CamtrapOptions) -> None:
    """Refuse, in one line, export options that cannot work (before any photo is classified)."""
    unknown = [fmt for fmt in formats if fmt not in EXPORT_FORMATS]
    if unknown:
        raise BirderError(f"unknown export format '{unknown[0]}'; choose from: {', '.join(EXPORT_FORMATS)}")
    if "camtrap-dp" in formats:
        require_timezone(options.timezone)
    elif options.timezone:
        parse_timezone(options.timezone)
    if (options.deployment_lat is None) != (options.deployment_lon is None):
        raise BirderError("give both --deployment-lat and --deployment-lon, or neither")
    if options.deployment_lat is not None and not (
        -90 <= options.deployment_lat <= 90 and -180 <= (options.deployment_lon or 0.0) <= 180
    ):
        raise BirderError("--deployment-lat must be within -90..90 and --deployment-lon within -180..180")


def export_results(
    results_dir: str | os.PathLike,
    formats: Sequence[str],
    options: CamtrapOptions,
    output_dir: str | os.PathLike | None = None,
) -> list[ExportReport]:
    """Write each export of ``formats`` for the results in ``results_dir`` (into ``output_dir``, by default the
    results folder: ``camtrap-dp/`` and ``coco-ct.json``)."""
    check_export(formats, options)
    results = read_results_folder(results_dir)
    if not results.photos:
        raise BirderError(f"'{results_dir}' holds no classified photos to export")
    target = Path(output_dir) if output_dir is not None else Path(results_dir)
    reports = []
    for fmt in dict.fromkeys(formats):  # each once, in the order given
        if fmt == "camtrap-dp":
            reports.append(export_camtrap_dp(results, target / CAMTRAP_DIR, options))
        else:
            reports.append(export_coco_ct(results, target / COCO_FILE))
    return reports


# ---------------------------------------------------------------------------------------------------------------------
# Command-line options (birder-predict and python -m birder.tools export share them)
# ---------------------------------------------------------------------------------------------------------------------


def add_export_arguments(
    parser: argparse.ArgumentParser, *, required: bool = False, extra_formats: Sequence[tuple[str, str]] = ()
) -> None:
    """``--export FORMAT`` (repeatable) and the options of the exports; ``extra_formats``: ``(name, what it is)``
    of formats the command writes itself (birder-predict's md-json)."""
    group = parser.add_argument_group("camera-trap exports")
    group.add_argument(
        "--export",
        dest="exports",
        action="append",
        choices=(*EXPORT_FORMATS, *(name for (name, _) in extra_formats)),
        required=required,
        default=None if required else [],
        help="also write this export (repeatable): Camtrap DP package, COCO Camera Traps JSON"
        + "".join(f", {what}" for (_, what) in extra_formats),
    )
    group.add_argument("--timezone", metavar="TZ", help="the photos' clock: +02:00 or Europe/Vienna (Camtrap DP)")
    group.add_argument("--deployment-lat", type=float, metavar="DEG", help="camera latitude where photos have no GPS")
    group.add_argument("--deployment-lon", type=float, metavar="DEG", help="camera longitude where photos have no GPS")
    group.add_argument("--project-title", default=CamtrapOptions.project_title, metavar="TEXT", help="(Camtrap DP)")
    group.add_argument("--contributor", default=CamtrapOptions.contributor, metavar="NAME", help="(Camtrap DP)")


def export_options(values: object) -> CamtrapOptions:
    """The export options of parsed arguments (or of any object with the same attribute names)."""
    return CamtrapOptions(
        timezone=getattr(values, "timezone", None),
        deployment_lat=getattr(values, "deployment_lat", None),
        deployment_lon=getattr(values, "deployment_lon", None),
        project_title=getattr(values, "project_title", CamtrapOptions.project_title),
        contributor=getattr(values, "contributor", CamtrapOptions.contributor),
    )
