"""Events: the photos one camera took of one visit, grouped by folder and the time between them.

A camera trap fires bursts; a person with a camera takes a series. Photos in one folder (one camera) whose EXIF
times are at most ``gap`` apart (each from the previous one) form an event. A photo without an EXIF time cannot be
placed in time: it is an event of its own, marked untimed.

An event's prediction combines its photos' image probabilities by the mean of their logarithms (a normalised
geometric mean): photos of one burst are not independent looks, so summing their evidence would make a ten-photo
burst ten times as sure; the mean keeps the event as sure as its typical photo while a species seen in every frame
wins over one seen in a single frame. The location-and-season prior is applied once, to the combined answer.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from birder.errors import BirderError

DEFAULT_GAP = "120s"
_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600}


def parse_gap(text: str | float | dt.timedelta) -> dt.timedelta:
    """``120s``, ``2m``, ``1h`` or a number of seconds -> a positive duration."""
    if isinstance(text, dt.timedelta):
        gap = text
    elif isinstance(text, (int, float)):
        gap = dt.timedelta(seconds=float(text))
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min|h)?\s*", str(text))
        if not match:
            raise BirderError(f"event gap '{text}' is not a duration (e.g. 120s, 2m, 1h)")
        gap = dt.timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2) or "s"])
    if gap <= dt.timedelta(0):
        raise BirderError(f"the event gap must be positive, got {text}")
    return gap


def parse_exif_time(text: str | None) -> dt.datetime | None:
    """A photo's EXIF time as the results table holds it (ISO 8601, no timezone); None when absent or unreadable."""
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.strip())
    except ValueError:
        return None


@dataclass
class Event:
    event_id: str
    folder: str  # the camera
    members: list[int]  # photo indices, in time order
    start: dt.datetime | None
    end: dt.datetime | None

    @property
    def timed(self) -> bool:
        return self.start is not None


def group_events(folders: Sequence[str], times: Sequence[dt.datetime | None], gap: dt.timedelta) -> list[Event]:
    """Events of photos given by their folders and EXIF times (None: untimed), ordered by folder then start
    (untimed photos last in their folder, in input order); ids ``E000001`` on in that order."""
    by_folder: dict[str, list[int]] = {}
    for index, folder in enumerate(folders):
        by_folder.setdefault(folder, []).append(index)

    groups: list[tuple[str, list[int], dt.datetime | None, dt.datetime | None]] = []
    for folder in sorted(by_folder):
        indices = by_folder[folder]
        timed = sorted((i for i in indices if times[i] is not None), key=lambda i: (times[i], i))
        current: list[int] = []
        for index in timed:
            if current and times[index] - times[current[-1]] > gap:  # type: ignore[operator]
                groups.append((folder, current, times[current[0]], times[current[-1]]))
                current = []
            current.append(index)
        if current:
            groups.append((folder, current, times[current[0]], times[current[-1]]))
        groups.extend((folder, [index], None, None) for index in indices if times[index] is None)

    return [Event(f"E{number:06d}", *group) for (number, group) in enumerate(groups, start=1)]


def combine_probabilities(probabilities: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    """``[photos, classes]`` -> ``[classes]``: the normalised geometric mean (mean of the logarithms)."""
    logs = np.log(np.maximum(np.asarray(probabilities, dtype=np.float64), np.finfo(np.float64).tiny))
    mean = logs.mean(axis=0)
    combined = np.exp(mean - mean.max())
    return combined / combined.sum()


@dataclass(frozen=True)
class EventsReport:
    """What ``--events`` wrote: the events table, how many events, how many of them untimed photos."""

    path: Path
    events: int
    untimed: int
