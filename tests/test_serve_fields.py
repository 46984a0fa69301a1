"""The fields a birder-serve client types (lat, lon, date, top_k, k, threshold), as form text or JSON values: every
input is either read as the number or date it says, or refused in one line naming the field; nothing else escapes."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")

from birder.errors import BirderError
from birder.geo.serve import request_place
from birder.serve.detect import _threshold
from birder.serve.uploads import ApiError, _field_text, parse_top_k

SETTINGS = settings(max_examples=300, derandomize=True, database=None, deadline=None)

# What people type: numbers in every notation, near and past the limits, words, blanks, control characters
numbers_as_text = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(-200, 200).map(lambda value: f"{value:.6f}"),
    st.integers(-1000, 1000).map(str),
    st.sampled_from(["", " ", "48,2", "1e400", "-0", "+90", "90.0000001", "nan", "Infinity", "0x10", "1_0", "١٢"]),
    st.text(max_size=12),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6,
)


def _one_line(message: str) -> None:
    assert message and "\n" not in message and "\r" not in message and len(message) < 300, message


@SETTINGS
@given(lat=numbers_as_text, lon=numbers_as_text, date=st.none() | numbers_as_text | st.dates().map(str))
def test_place_fields_are_read_or_refused_naming_the_field(lat: str, lon: str, date: str | None) -> None:
    fields = {"lat": lat, "lon": lon} | ({"date": date} if date is not None else {})
    try:
        (location, day) = request_place(fields)
    except BirderError as err:
        _one_line(str(err))
        assert any(f"'{name}'" in str(err) for name in ("lat", "lon", "date")), str(err)
        return
    if location is not None:
        (latitude, longitude) = location
        assert latitude == float(lat.strip()) and -90 <= latitude <= 90
        assert longitude == float(lon.strip()) and -180 <= longitude <= 180
    else:
        assert not lat.strip() and not lon.strip()
    assert day == ((date or "").strip() or None)


@SETTINGS
@given(lat=st.floats(-90, 90) | st.integers(-90, 90), lon=st.floats(-180, 180) | st.integers(-180, 180))
def test_json_numbers_in_range_are_read_exactly(lat: float, lon: float) -> None:
    fields = {"lat": _field_text(lat), "lon": _field_text(lon)}
    assert request_place(fields) == ((float(lat), float(lon)), None)


@SETTINGS
@given(value=json_values)
def test_json_values_become_the_text_a_form_would_carry(value: object) -> None:
    text = _field_text(value)
    if isinstance(value, str):
        assert text == value
        return
    assert json.dumps(json.loads(text)) == text  # the JSON value itself, as JSON writes it
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        assert float(text) == value


@SETTINGS
@given(raw=st.none() | numbers_as_text, num_classes=st.integers(1, 50))
def test_top_k_is_a_count_of_species_or_a_400(raw: str | None, num_classes: int) -> None:
    try:
        top_k = parse_top_k(raw, 5, num_classes)
    except ApiError as err:
        assert err.status == 400 and "top_k" in err.message
        _one_line(err.message)
        return
    assert 1 <= top_k <= num_classes
    if raw not in (None, ""):
        assert top_k == min(int(raw), num_classes)


@SETTINGS
@given(raw=st.none() | numbers_as_text)
def test_detection_threshold_is_a_fraction_or_a_400(raw: str | None) -> None:
    try:
        value = _threshold(raw, 0.5)
    except ApiError as err:
        assert err.status == 400 and "threshold" in err.message
        _one_line(err.message)
        return
    assert 0.0 <= value <= 1.0
