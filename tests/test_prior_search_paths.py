"""The held-out scorer's three ways of summing season-weighted counts (one sparse product, expansions kept from
candidate to candidate, chunks) give the same scores: which one runs depends only on the sizes involved."""

from dataclasses import replace

import pytest
from test_prior_settings import SETTINGS, migrant_records

from birder.geo import prior_search
from birder.geo.grid import cells_of_points
from birder.geo.prior_search import BLOCK_RESOLUTION, HeldOutScorer, spatial_folds

# Every part on (rings, local seasons), then none of the optional ones
CANDIDATES = (SETTINGS, replace(SETTINGS, season_resolution=None, neighbour_weight=0.0))


def _scores() -> list[float]:
    records = migrant_records(1500, seed=2)
    records.day_bins[::5] = -1  # undated records: the extra column of ones
    cells = cells_of_points(records.latitudes, records.longitudes, BLOCK_RESOLUTION)
    (folds, _) = spatial_folds(cells, 4, seed=0)
    scorer = HeldOutScorer(records, 3, [1, 2, 3], cells, folds, 4)
    # Twice each: the second time from what the first one kept
    return [scorer.score(candidate) for candidate in (*CANDIDATES, *CANDIDATES)]


@pytest.mark.parametrize(("cached", "chunk"), [(10_000_000, 64), (0, 64), (0, 1)])
def test_expanded_and_chunked_sums_score_as_the_default_sums(monkeypatch, cached: int, chunk: int) -> None:
    # At the module's sizes the coarse levels take the sparse product and the finer ones expansions kept between
    # candidates; a chunk of 64 elements rules the product out, no room to keep expansions leaves chunks of rows
    # (64 elements, or one row each)
    reference = _scores()
    monkeypatch.setattr(prior_search, "_CACHED_ELEMENTS", cached)
    monkeypatch.setattr(prior_search, "_CHUNK_ELEMENTS", chunk)
    assert _scores() == pytest.approx(reference, abs=1e-9)
    assert reference[:2] == pytest.approx(reference[2:], abs=1e-12)
