"""The prior's settings chosen from the records: spatial-block folds, exact held-out scores, the search's choices,
what `birder-prior build` prints and what the .bpr file keeps (old files still load)."""

import csv
import datetime as dt
import json
import re
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from birder.geo.build import build_prior_file
from birder.geo.grid import cells_of_points
from birder.geo.prior import LocationPrior, PriorSettings
from birder.geo.prior_file import load_prior
from birder.geo.prior_search import (
    BLOCK_RESOLUTION,
    TIE,
    HeldOutScorer,
    SearchSpace,
    choose_settings,
    spatial_folds,
)
from birder.geo.records import Records
from birder.geo.season import DAY_BINS
from birder.scripts.prior import main as prior_main

FIXTURES = Path(__file__).parent / "fixtures"
CLASSES = ["Parus major", "Erithacus rubecula", "Pica pica"]


# Every part of the prior on (rings, local seasons)
SETTINGS = PriorSettings(
    resolutions=(1, 2, 3),
    pseudo_count=4.0,
    pseudo_count_growth=3.0,
    neighbour_weight=0.5,
    kernel_days=9.0,
    season_pseudo_count=3.0,
    season_resolution=2,
    local_season_pseudo_count=5.0,
    floor=0.02,
    base_resolution=BLOCK_RESOLUTION,
)


def checkerboard_records(count: int, seed: int) -> Records:
    """Two species on a checkerboard of squares about 90 km wide (0.8° x 1.1° near 48°N), a third everywhere."""
    rng = np.random.default_rng(seed)
    lat = rng.uniform(44.0, 52.0, count)
    lon = rng.uniform(0.0, 16.0, count)
    square = (np.floor(lat / 0.8) + np.floor(lon / 1.1)).astype(int) % 2
    species = np.where(rng.random(count) < 0.2, 2, square)
    days = rng.integers(0, DAY_BINS, count).astype(np.int16)
    return Records(lat, lon, days, species.astype(np.int32), np.ones(count, np.float32))


def migrant_records(count: int, seed: int) -> Records:
    """Pica pica breeds in the north (55°N) from May to August and winters in the south (45°N) from November to
    February; Parus major and Erithacus rubecula live everywhere all year."""
    rng = np.random.default_rng(seed)
    species = rng.choice(3, size=count, p=[0.35, 0.35, 0.3])
    summer = rng.random(count) < 0.5
    days = rng.integers(0, DAY_BINS, count)
    migrant = species == 2
    days[migrant & summer] = rng.integers(121, 243, int((migrant & summer).sum()))
    days[migrant & ~summer] = (rng.integers(-59, 59, int((migrant & ~summer).sum()))) % DAY_BINS
    lat = rng.uniform(43.0, 57.0, count)
    lat[migrant] = np.where(summer[migrant], 55.0, 45.0) + rng.normal(0, 1.0, int(migrant.sum()))
    lon = rng.uniform(0.0, 20.0, count)
    return Records(lat, lon, days.astype(np.int16), species.astype(np.int32), np.ones(count, np.float32))


def write_records_csv(path: Path, records: Records) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["species", "decimalLatitude", "decimalLongitude", "eventDate"])
        for lat, lon, day, species in zip(
            records.latitudes, records.longitudes, records.day_bins, records.classes, strict=True
        ):
            date = dt.date(2023, 1, 1) + dt.timedelta(days=int(day))
            writer.writerow([CLASSES[species], f"{lat:.5f}", f"{lon:.5f}", date.isoformat()])
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Folds and scores
# ---------------------------------------------------------------------------------------------------------------------


def test_spatial_folds_never_split_a_block_or_a_spot() -> None:
    rng = np.random.default_rng(0)
    # 300 spots (hides, hotspots), each with many records at the very same coordinates, and scattered records
    spots = np.c_[rng.uniform(47.0, 49.0, 300), rng.uniform(10.0, 13.0, 300)]
    spot_of_record = rng.integers(0, 300, 3000)
    lat = np.r_[spots[spot_of_record, 0], rng.uniform(47.0, 49.0, 1000)]
    lon = np.r_[spots[spot_of_record, 1], rng.uniform(10.0, 13.0, 1000)]
    blocks = cells_of_points(lat, lon, BLOCK_RESOLUTION)
    (folds, count) = spatial_folds(blocks, 5, seed=3)

    assert count == len(np.unique(blocks))
    for block in np.unique(blocks):
        assert len(np.unique(folds[blocks == block])) == 1, "a block's records went to two folds"
    for spot in range(300):
        assert len(np.unique(folds[:3000][spot_of_record == spot])) <= 1, "records at one spot went to two folds"
    blocks_per_fold = [len(np.unique(blocks[folds == fold])) for fold in range(5)]
    assert max(blocks_per_fold) - min(blocks_per_fold) <= 1  # whole blocks dealt evenly
    np.testing.assert_array_equal(spatial_folds(blocks, 5, seed=3)[0], folds)  # seeded


def test_held_out_score_is_the_built_priors_log_likelihood() -> None:
    """The scorer's shortcut (counts of all minus the fold's, two numbers per record) gives exactly what building
    a prior on the other folds and looking the held-out records up gives, with every part of the model on."""
    records = migrant_records(2500, seed=1)
    records.day_bins[::7] = -1  # undated records are scored on their place alone
    cells = cells_of_points(records.latitudes, records.longitudes, BLOCK_RESOLUTION)
    (folds, _) = spatial_folds(cells, 4, seed=0)
    scorer = HeldOutScorer(records, 3, [1, 2, 3], cells, folds, 4)
    settings = SETTINGS  # every part on
    for candidate in (settings, replace(settings, season_resolution=None, neighbour_weight=0.0)):
        log_likelihood = np.zeros(len(records))
        for fold in range(4):
            (train, held) = (folds != fold, folds == fold)
            subset = Records(*(getattr(records, name)[train] for name in Records.__dataclass_fields__))
            prior = LocationPrior.build(subset, CLASSES, candidate)
            vectors = prior.probabilities_many(
                records.latitudes[held], records.longitudes[held], records.day_bins[held]
            )
            log_likelihood[held] = np.log(vectors[np.arange(held.sum()), records.classes[held]])
        assert scorer.score(candidate) == pytest.approx(log_likelihood.mean(), abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# The search's choices
# ---------------------------------------------------------------------------------------------------------------------


def test_dense_records_get_finer_cells_than_sparse_ones() -> None:
    # Only the finest resolution varies: the checkerboard's 90 km squares need cells of resolution 3 or finer to
    # be seen, which a few hundred records cannot fill
    space = SearchSpace(
        finest_resolutions=(1, 2, 3, 4, 5),
        pseudo_counts=(10.0,),
        pseudo_count_growths=(1.0,),
        neighbour_weights=(0.0,),
        kernel_days=(15.0,),
        season_pseudo_counts=(10.0,),
        season_resolutions=(None,),
        floors=(0.01,),
    )
    dense = choose_settings(checkerboard_records(20_000, seed=0), 3, space=space)
    sparse = choose_settings(checkerboard_records(400, seed=0), 3, space=space)
    (dense_finest, sparse_finest) = (max(dense.settings.resolutions), max(sparse.settings.resolutions))
    assert dense_finest >= 3 and sparse_finest <= 2, (dense_finest, sparse_finest)
    # The dense records' choice beats the sparse records' choice on the dense records' own held-out score
    scores = {max(candidate.settings.resolutions): candidate.heldout_loglik for candidate in dense.candidates}
    assert scores[dense_finest] > scores[sparse_finest]


def test_full_search_beats_the_fixed_defaults_and_keeps_given_settings() -> None:
    records = checkerboard_records(6_000, seed=2)
    choice = choose_settings(records, 3, fixed={"floor": 0.02})
    assert choice.settings.floor == 0.02 and choice.fixed == ("floor",)
    assert all(candidate.settings.floor == 0.02 for candidate in choice.candidates)
    start = choice.candidates[0]
    assert choice.chosen_loglik > start.heldout_loglik + 0.05  # the fixed defaults are the start
    # The best candidate, or one tied with it that is coarser or smoother
    assert choice.chosen_loglik >= max(candidate.heldout_loglik for candidate in choice.candidates) - TIE


def test_local_seasons_chosen_for_a_migrant_and_used_by_the_prior() -> None:
    records = migrant_records(6_000, seed=0)
    choice = choose_settings(records, 3)
    assert choice.settings.season_resolution is not None, choice.lines()
    prior = LocationPrior.build(records, CLASSES, choice.settings)
    (north, south) = ((55.0, 10.0), (45.0, 10.0))
    (june, january) = ("2023-06-20", "2023-01-15")
    assert prior.lookup(north, june).vector[2] > 3 * prior.lookup(north, january).vector[2]
    assert prior.lookup(south, january).vector[2] > 3 * prior.lookup(south, june).vector[2]
    # One season everywhere cannot tell: the migrant is as likely in the north in January as in June
    everywhere = LocationPrior.build(records, CLASSES, replace(choice.settings, season_resolution=None))
    assert everywhere.lookup(north, january).vector[2] > 0.5 * everywhere.lookup(north, june).vector[2]


def test_too_few_records_keep_the_defaults_and_say_why() -> None:
    choice = choose_settings(checkerboard_records(50, seed=0), 3, fixed={"kernel_days": 20.0})
    assert choice.skipped is not None and not choice.candidates
    assert choice.settings == PriorSettings(kernel_days=20.0)
    (line,) = choice.lines()
    assert "not chosen from the records" in line and "50 records" in line


# ---------------------------------------------------------------------------------------------------------------------
# The .bpr file and birder-prior build
# ---------------------------------------------------------------------------------------------------------------------


def test_chosen_settings_and_search_round_trip_in_the_file(tmp_path: Path) -> None:
    path = write_records_csv(tmp_path / "records.csv", migrant_records(3_000, seed=4))
    # Local seasons fixed on: their arrays must round-trip too
    report = build_prior_file(path, CLASSES, tmp_path / "p.bpr", fixed={"season_resolution": 2})
    assert report.choice is not None and report.choice.settings.season_resolution == 2
    loaded = load_prior(tmp_path / "p.bpr")
    assert loaded.settings == report.choice.settings == report.prior.settings
    assert loaded.settings_search == report.choice.as_dict()
    with zipfile.ZipFile(tmp_path / "p.bpr") as archive:
        metadata = json.loads(archive.read("metadata.json"))
        assert metadata["version"] == 2 and "season_counts.npy" in archive.namelist()
    stored = metadata["settings_search"]
    assert stored["folds"] == 5 and stored["block_resolution"] == BLOCK_RESOLUTION
    assert len(stored["candidates"]) == len(report.choice.candidates)
    assert all(np.isfinite(candidate["heldout_loglik"]) for candidate in stored["candidates"])
    for place, day in (((55.0, 10.0), "2023-06-20"), ((45.0, 3.0), "2023-01-10"), ((50.0, 8.0), None)):
        np.testing.assert_allclose(loaded.lookup(place, day).vector, report.prior.lookup(place, day).vector, rtol=1e-6)
    summary = loaded.describe()["settings_search"]
    assert summary["candidates"] == len(report.choice.candidates)
    assert summary["chosen_heldout_loglik"] == pytest.approx(report.choice.chosen_loglik, abs=1e-6)


def test_a_version_1_file_loads_and_gives_the_same_lookups() -> None:
    prior = load_prior(FIXTURES / "prior_v1.bpr")
    assert prior.settings == PriorSettings()  # the old defaults; the new settings at what makes the same prior
    assert prior.settings_search is None and prior.season_counts is None
    expected = json.loads((FIXTURES / "prior_v1_lookups.json").read_text())["lookups"]
    for lat, lon, date, vector in expected:
        np.testing.assert_allclose(prior.lookup((lat, lon), date).vector, vector, rtol=1e-5, atol=1e-7)
    assert "settings_search" not in prior.describe()


def test_build_prints_every_candidates_held_out_log_likelihood(tmp_path: Path, capsys) -> None:
    records = write_records_csv(tmp_path / "records.csv", checkerboard_records(3_000, seed=5))
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    argv = ["build", str(records), "--classes", str(tmp_path / "classes.txt"), "-o", str(tmp_path / "p.bpr")]
    assert prior_main([*argv, "--floor", "0.02"]) == 0
    out = capsys.readouterr().out
    assert "settings chosen by held-out log-likelihood" in out and "fixed: floor" in out
    printed = np.array([float(value) for value in re.findall(r"-\d+\.\d{5}", out)])
    candidates = load_prior(tmp_path / "p.bpr").settings_search["candidates"]
    for candidate in candidates:  # stored to 6 decimals, printed to 5
        assert np.abs(printed - candidate["heldout_loglik"]).min() <= 6e-6, candidate
    chosen = [line for line in out.splitlines() if line.startswith("settings: ")]
    assert len(chosen) == 1 and "floor 0.02" in chosen[0]
    assert all(line.count("*") <= 1 for line in out.splitlines())  # one value kept per step

    assert prior_main([*argv, "--no-search", "--pseudo-count", "30", "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "held-out" not in out
    assert load_prior(tmp_path / "p.bpr").settings == PriorSettings(pseudo_count=30.0)
