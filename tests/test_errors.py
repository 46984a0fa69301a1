"""One-line refusals of counts and sizes below their minimum, shared by the batch loop and the server's batcher."""

from __future__ import annotations

import math

import pytest

from birder.errors import BirderError, check_at_least
from birder.serve.batcher import DynamicBatcher


@pytest.mark.parametrize(("value", "minimum"), [(0, 1), (-1, 0), (math.nan, 0)])
def test_below_the_minimum_is_one_line_naming_it(value: float, minimum: float) -> None:
    with pytest.raises(BirderError, match=r"^the batch size must be at least") as caught:
        check_at_least(value, minimum, "the batch size")
    assert "\n" not in str(caught.value)


def test_at_the_minimum_passes() -> None:
    check_at_least(1, 1, "the batch size")
    check_at_least(0.0, 0, "the batching window")


def test_the_batcher_refuses_a_zero_batch_and_a_negative_window() -> None:
    with pytest.raises(ValueError, match="max_batch_size must be at least 1, got 0"):
        DynamicBatcher(lambda inputs: [], max_batch_size=0)
    with pytest.raises(ValueError, match=r"the batching window must be at least 0, got -0\.5"):
        DynamicBatcher(lambda inputs: [], window_s=-0.5)
