"""The seasonal part of the prior: days of the year on a circle, and a wrapped Gaussian kernel over them.

A year is :data:`DAY_BINS` bins; a date falls in the bin of its fraction of its own year, so 31 December is next to
1 January and a leap year's 366 days fit the same bins.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import numpy.typing as npt

DAY_BINS = 365


def day_bins(day_of_year: npt.NDArray[np.integer], leap: npt.NDArray[np.bool_]) -> npt.NDArray[np.int16]:
    """The bin (0 .. 364) of each day of the year (1 .. 365 or 366 in a leap year)."""
    days_in_year = np.where(leap, 366, 365)
    fraction = (np.asarray(day_of_year, dtype=np.float64) - 0.5) / days_in_year
    return np.minimum((fraction * DAY_BINS).astype(np.int16), DAY_BINS - 1)


def day_bin_of_date(date: dt.date) -> int:
    leap = date.year % 4 == 0 and (date.year % 100 != 0 or date.year % 400 == 0)
    return int(day_bins(np.array([date.timetuple().tm_yday]), np.array([leap]))[0])


def _kernel_row(width_days: float) -> npt.NDArray[np.float64]:
    """Row 0 of :func:`circular_kernel` (every other row is it turned)."""
    distance = np.arange(DAY_BINS)
    distance = np.minimum(distance, DAY_BINS - distance)
    if width_days <= 0:
        return (distance == 0).astype(np.float64)
    row = np.exp(-0.5 * (distance / width_days) ** 2)
    return row / row.sum()


def circular_kernel(width_days: float) -> npt.NDArray[np.float64]:
    """``[bins, bins]``: row ``b`` is a wrapped Gaussian of standard deviation ``width_days`` around bin ``b``,
    summing to 1 (0 days: no smoothing)."""
    bins = np.arange(DAY_BINS)
    distance = np.abs(bins[:, None] - bins[None, :])
    distance = np.minimum(distance, DAY_BINS - distance)  # around the circle
    if width_days <= 0:
        return (distance == 0).astype(np.float64)

    kernel = np.exp(-0.5 * (distance / width_days) ** 2)
    return kernel / kernel.sum(axis=1, keepdims=True)


def smooth_days(counts: npt.NDArray[np.floating], width_days: float) -> npt.NDArray[np.float64]:
    """``counts[..., DAY_BINS]`` smoothed by :func:`circular_kernel` along the days."""
    # The kernel is circulant (row b is row 0 turned by b): smoothing is a circular convolution, done by FFT
    kernel_spectrum = np.fft.rfft(_kernel_row(width_days))
    smoothed = np.fft.irfft(np.fft.rfft(np.asarray(counts, dtype=np.float64), axis=-1) * kernel_spectrum, n=DAY_BINS)
    return np.maximum(smoothed, 0.0)  # rounding must not make a count negative


def seasonal_factors(
    day_counts: npt.NDArray[np.floating], width_days: float, pseudo_count: float
) -> npt.NDArray[np.float32]:
    """``[classes, bins]``: how much more (or less) likely each class is on each day than on an average day.

    Each class's days are smoothed with the kernel and shrunk toward a year-round presence by ``pseudo_count``
    records, so a class seen a handful of times is not ruled out on the other days; the factors average 1 over
    the year. A class without dated records gets 1 everywhere (year-round).
    """
    counts = np.asarray(day_counts, dtype=np.float64)
    smoothed = smooth_days(counts, width_days)
    totals = counts.sum(axis=1, keepdims=True)
    density = (smoothed + pseudo_count / DAY_BINS) / (totals + pseudo_count)
    return (density * DAY_BINS).astype(np.float32)


def local_seasonal_factors(
    everywhere: npt.NDArray[np.floating],
    local_counts: npt.NDArray[np.floating],
    width_days: float,
    pseudo_count: float,
) -> npt.NDArray[np.float32]:
    """``[classes, bins]`` seasonal factors in one place: the place's own dated records of each class (``local_counts``,
    smoothed by the kernel) shrunk toward the class's factors ``everywhere`` by ``pseudo_count`` records, so a
    class seen there a few times keeps nearly its season everywhere, and one seen often there its season there (a
    migrant that winters in the south and breeds in the north). Averages 1 over the year like the factors
    everywhere."""
    counts = np.asarray(local_counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    factors = (smooth_days(counts, width_days) * DAY_BINS + pseudo_count * everywhere) / (totals + pseudo_count)
    return factors.astype(np.float32)
