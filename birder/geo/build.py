"""``birder-prior build`` as one library call: records file + a model's classes -> a ``.bpr`` file."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from birder.errors import BirderError
from birder.geo.prior import LocationPrior, PriorSettings
from birder.geo.prior_file import save_prior
from birder.geo.prior_search import SettingsChoice, choose_settings
from birder.geo.records import RecordReport, read_mapping_file, read_records
from birder.io.checkpoint import names_by_index
from birder.io.outputs import check_output_file

CLASS_LIST_SUFFIXES = (".txt",)


def class_names_of(source: str | os.PathLike) -> list[str]:
    """The class names, in index order, of a model file (checkpoint or export; its metadata only) or of a text
    file with one name per line."""
    path = Path(source)
    if path.suffix.lower() in CLASS_LIST_SUFFIXES:
        from birder.inference.predictor import read_species_file

        return read_species_file(path)

    from birder.io.checkpoint import is_export_file, read_checkpoint

    if is_export_file(path):
        from birder.io.export import read_export_metadata

        metadata = read_export_metadata(path)
    else:
        (state, metadata) = read_checkpoint(path)  # tensors memory-mapped, never read
        del state
    class_to_idx = metadata.get("class_to_idx") or {}
    if not class_to_idx:
        raise BirderError(f"{path}: the model has no classes (a pretraining encoder); a prior needs its class list")
    return names_by_index(class_to_idx)


@dataclass
class BuildReport:
    prior: LocationPrior
    records: RecordReport
    seconds: float
    file_bytes: int
    choice: SettingsChoice | None = None  # how the settings were chosen (None: given)


def build_prior_file(
    records: str | os.PathLike,
    classes: str | os.PathLike | Sequence[str],
    output: str | os.PathLike,
    *,
    mapping: str | os.PathLike | None = None,
    columns: Mapping[str, str] | None = None,
    settings: PriorSettings | None = None,
    fixed: Mapping[str, Any] | None = None,
    search: bool = True,
    overwrite: bool = False,
) -> BuildReport:
    """Read ``records``, count them for ``classes`` (a model file, a class-list file or the names) and write the
    prior to ``output`` atomically (an existing ``output`` only with ``overwrite``; never one of the inputs).

    The prior's settings: ``settings`` as given; else chosen from the records by held-out log-likelihood
    (:func:`birder.geo.prior_search.choose_settings`, ``fixed`` holding those the user set), or without
    ``search`` the defaults with ``fixed``.
    """
    started = time.perf_counter()
    class_file = None if isinstance(classes, (list, tuple)) else classes
    check_output_file(output, inputs=(records, class_file, mapping), overwrite=overwrite, option="-o")
    class_names = list(classes) if isinstance(classes, (list, tuple)) else class_names_of(classes)
    names_map = read_mapping_file(mapping, class_names) if mapping is not None else None
    (usable, report) = read_records(records, class_names, mapping=names_map, columns=columns)
    if len(usable) == 0:
        raise BirderError(f"no usable records in '{records}': " + "; ".join(report.lines()[1:] or ["it is empty"]))

    choice = None
    if settings is None and search:
        choice = choose_settings(usable, len(class_names), fixed=dict(fixed or {}))
        settings = choice.settings
    elif settings is None:
        settings = PriorSettings(**dict(fixed or {}))
    prior = LocationPrior.build(usable, class_names, settings, records_report=report.as_dict(), source=str(records))
    prior.settings_search = choice.as_dict() if choice is not None else None
    save_prior(prior, output)
    seconds = time.perf_counter() - started
    return BuildReport(prior, report, seconds, Path(output).stat().st_size, choice)
