"""Events: grouping photos by camera folder and time gap, and combining their probabilities."""

import datetime as dt

import numpy as np
import pytest

from birder.errors import BirderError
from birder.geo.events import combine_probabilities, group_events, parse_exif_time, parse_gap

T0 = dt.datetime(2023, 5, 14, 7, 0, 0)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def test_photos_grouped_by_folder_and_gap_untimed_alone() -> None:
    folders = ["camA", "camA", "camA", "camA", "camB", "camB", "camA"]
    times = [at(0), at(400), at(60), at(170), at(30), None, None]  # camA out of time order on purpose
    events = group_events(folders, times, dt.timedelta(seconds=120))
    assert [(e.folder, e.members, e.timed) for e in events] == [
        ("camA", [0, 2, 3], True),  # 0, 60, 170 s: each within 120 s of the previous one
        ("camA", [1], True),  # 400 s: 230 s after 170
        ("camA", [6], False),  # no EXIF time: an event of its own, marked
        ("camB", [4], True),  # another camera, though at 30 s
        ("camB", [5], False),
    ]
    assert [e.event_id for e in events] == ["E000001", "E000002", "E000003", "E000004", "E000005"]
    assert (events[0].start, events[0].end) == (at(0), at(170))
    assert events[2].start is None and events[2].end is None


def test_gap_parsing() -> None:
    assert parse_gap("120s") == parse_gap("2m") == parse_gap("120") == parse_gap(120) == dt.timedelta(minutes=2)
    assert parse_gap("1h") == dt.timedelta(hours=1) and parse_gap("1.5min") == dt.timedelta(seconds=90)
    for bad in ("soon", "-5s", "0"):
        with pytest.raises(BirderError, match="gap"):
            parse_gap(bad)


def test_exif_times_parsed_or_none() -> None:
    assert parse_exif_time("2023-05-14T07:32:10") == dt.datetime(2023, 5, 14, 7, 32, 10)
    assert parse_exif_time("") is None and parse_exif_time(None) is None and parse_exif_time("garbage") is None


def test_combination_is_the_normalised_geometric_mean() -> None:
    # Two frames fairly sure of class 0, one frame very sure of class 1: the burst says class 0
    frames = np.array([[0.8, 0.15, 0.05], [0.8, 0.15, 0.05], [0.1, 0.85, 0.05]])
    combined = combine_probabilities(frames)
    expected = np.exp(np.log(frames).mean(axis=0))
    np.testing.assert_allclose(combined, expected / expected.sum())
    assert np.argmax(combined) == 0 and combined.sum() == pytest.approx(1.0)
    # One photo: its own probabilities; identical photos: no more sure than one of them
    np.testing.assert_allclose(combine_probabilities(frames[:1]), frames[0])
    np.testing.assert_allclose(combine_probabilities(np.repeat(frames[:1], 10, axis=0)), frames[0])
    # A zero probability does not make the logarithm blow up
    assert np.isfinite(combine_probabilities(np.array([[1.0, 0.0], [0.5, 0.5]]))).all()
