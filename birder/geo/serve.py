"""The location-and-season prior in ``birder-serve``: ``lat``, ``lon`` and ``date`` form fields (or query
parameters) of ``POST /v1/classify``.

With a prior loaded (``birder-serve --prior FILE``), the answer's ``predictions`` are the adjusted top-k (step 4 of
:mod:`birder.inference.decision`), ``image_predictions`` the image-only top-k beside them, and ``prior`` says how
the prior was used: ``{"mode": "place_day" | "place" | "none", "strength": ..., "out_of_range": true | false |
null}``. A request without a position gets the image's answer (mode ``none``); one with a position but no date the
year-round prior (``place``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from birder.errors import BirderError
from birder.geo.prior import MODE_NONE, LocationPrior, out_of_range, parse_date
from birder.inference.decision import apply_prior


def _shown(text: str) -> str:
    """A client's field value fit to quote in a one-line error: printable, and short."""
    text = "".join(char if char.isprintable() else "?" for char in text)
    return text if len(text) <= 40 else text[:37] + "..."


def _field_number(fields: Mapping[str, str], name: str, limit: float) -> float | None:
    text = (fields.get(name) or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise BirderError(f"'{name}' must be a number in degrees, got '{_shown(text)}'") from None
    if not -limit <= value <= limit:
        raise BirderError(f"'{name}' must be within -{limit:g}..{limit:g}, got {value:g}")
    return value


def request_place(fields: Mapping[str, str]) -> tuple[tuple[float, float] | None, str | None]:
    """The (location, date) of a request's ``lat``, ``lon`` and ``date`` fields; a bad value is one-line error."""
    (latitude, longitude) = (_field_number(fields, "lat", 90), _field_number(fields, "lon", 180))
    if (latitude is None) != (longitude is None):
        raise BirderError("give both 'lat' and 'lon', or neither")
    date = (fields.get("date") or "").strip() or None
    if date is not None and parse_date(date) is None:
        raise BirderError(f"'date' must be a date (YYYY-MM-DD), got '{_shown(date)}'")
    return ((latitude, longitude) if latitude is not None else None, date)


def prior_answer(
    prior: LocationPrior,
    strength: float,
    probabilities: npt.NDArray[np.floating],
    fields: Mapping[str, str],
    top_k: int,
    class_names: Sequence[str],
) -> tuple[npt.NDArray[np.float64], dict[str, Any]]:
    """``(adjusted probabilities [classes], the response's added keys)`` for one image."""
    (location, date) = request_place(fields)
    answer = prior.lookup(location, date)
    mode = answer.mode if answer.vector is not None else MODE_NONE
    adjusted = apply_prior(probabilities[None, :], answer.vector, strength)[0]
    order = np.argsort(-probabilities, kind="stable")[:top_k]
    image = [{"species": class_names[i], "index": int(i), "probability": float(probabilities[i])} for i in order]
    info = {"mode": mode, "strength": strength, "out_of_range": out_of_range(probabilities, answer.vector)}
    return (adjusted, {"image_predictions": image, "prior": info})
