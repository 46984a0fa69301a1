"""Where a ``birder-predict`` run's time goes: seconds per stage, for ``run.json`` and the end-of-run summary.

Stages (:data:`STAGES`): ``decode`` (reading, decoding and preprocessing the photos, measured where it happens: in
the loader's worker processes, in parallel with the rest, or in the main process with ``-j 0``), ``waiting`` (the
main process waiting for the loader's next batch: decoding that compute did not hide), ``detector``, ``crops``
(cutting the boxes' crops and the classifier's preprocessing of them, second decodes included), ``classifier``,
``decision`` (species list, prior, top-k, the answer: the rows) and ``writing`` (the journals). Each is given as
seconds and as its share of the run's wall time; the main process's stages add up to at most the wall time,
``decode`` in workers may overlap them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

STAGES = ("decode", "waiting", "detector", "crops", "classifier", "decision", "writing")
T = TypeVar("T")


class StageTimes:
    """Seconds spent per stage (see the module's docstring); stages never timed are left out."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r} (one of {', '.join(STAGES)})")
        self.seconds[stage] = self.seconds.get(stage, 0.0) + float(seconds)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the time the ``with`` block takes to ``stage``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - started)

    def waited(self, items: Iterable[T], stage: str = "waiting") -> Iterator[T]:
        """``items``, the time spent getting each one added to ``stage`` (a loader's next batch)."""
        iterator = iter(items)
        while True:
            started = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                self.add(stage, time.perf_counter() - started)
                return
            self.add(stage, time.perf_counter() - started)
            yield item

    def as_dict(self, wall_seconds: float) -> dict[str, dict[str, float]]:
        """``{stage: {"seconds": s, "share": s / wall_seconds}}`` in :data:`STAGES` order (``run.json``)."""
        return {
            stage: {
                "seconds": round(self.seconds[stage], 3),
                "share": round(self.seconds[stage] / wall_seconds, 4) if wall_seconds > 0 else 0.0,
            }
            for stage in STAGES
            if stage in self.seconds
        }

    def format(self, wall_seconds: float, workers: int = 0) -> str:
        """One line of the end-of-run summary: each stage's seconds and share of the wall time."""
        parts = []
        for stage, values in self.as_dict(wall_seconds).items():
            where = f", {workers} workers" if stage == "decode" and workers > 0 else ""
            parts.append(f"{stage} {values['seconds']:.1f} s ({100 * values['share']:.0f}%{where})")
        return "  stages        " + ", ".join(parts)


def stages_info(times: StageTimes | None, wall_seconds: float) -> dict[str, Any]:
    """What ``run.json`` records of a run's stages (nothing when the run did not time them)."""
    return {} if times is None or not times.seconds else {"stages": times.as_dict(wall_seconds)}
