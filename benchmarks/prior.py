"""Location-and-season prior figures on generated data: top-1 gain, the share of the true prior's gain the built
prior reaches, out_of_range flags, build time, file size. Writes ``benchmarks/results/prior.json``.

    python -m benchmarks.prior                  # everything (about 15 minutes on 2 cores)
    python -m benchmarks.prior --skip-scale     # no 1 M / 5 M record builds
    python -m benchmarks.prior --skip-scale --worlds blobs --records 20000    # one world, one download size

The world (fixed; the benchmark has no knobs for it, so it cannot be tuned to the prior):

- a 3,000 x 3,000 km square centred on 50°N 10°E (central Europe); planar kilometres become latitude and
  longitude by the inverse azimuthal equidistant projection on a sphere of radius 6,371 km;
- 50 species, abundances log-normal (sigma 1); each range is 1-3 Gaussian blobs with centres uniform in the
  square and standard deviations uniform in 300-800 km (points outside the square are drawn again); each season
  a window of 60-365 days starting on a uniform day (wrapping around the new year); dates in 2015-2024;
- 100,000 records drawn from that world (species by abundance, then blob, place and day) build the prior as
  ``birder-prior build`` does (settings chosen from the records), from a Parquet file as a user would;
- 5,000 test photos drawn the same way (another seed). Their image-only probabilities come from a simulated
  classifier: logits ``a * onehot(true) + N(0, 1)``, probabilities ``softmax(a * logits)`` (the exact posterior of
  that noise model, so the image part is calibrated), ``a`` set by bisection on separate draws so image-only top-1
  is 0.60.

Measured at the default strength (1): top-1 with the prior at the true place and day (target: +10 points or more),
with the place moved 50 km in a uniformly random direction and the day by 15 days either way (GPS and clock
errors; target: +8 points), and with a place drawn uniformly over the square (a badly wrong location: reported,
no target), each with its ``out_of_range`` flags (how many, and how many of them were image errors). Then the
build time and file size of priors from 1 and 5 million records.

**Share of the true prior's gain** (``gain``): on two worlds built in different ways (``benchmarks.prior_worlds``:
this one, ``blobs``, and ``shapes``, with bands, patches, rings, partial migrants and observer biases), a GBIF-style
download of 20,000, 60,000 and 200,000 rows (missing positions, (0, 0), year- or month-only dates, absences,
species outside the model, names with authors) builds a prior; 20,000 photos at their true place and day give the
image-only top-1, the top-1 with the world's true p(species | place, day), with the built prior, and with a prior
of the fixed settings used before the search. Target: the built prior reaches 85 % of the true prior's gain on
both worlds at every size. The settings search was developed on ``blobs``; ``shapes`` was run once it was done.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from birder.geo.build import build_prior_file
from birder.geo.prior import LocationPrior, out_of_range
from birder.geo.prior_file import load_prior
from birder.geo.prior_search import describe_settings
from birder.geo.season import day_bins
from birder.inference.decision import apply_prior

EARTH_RADIUS_KM = 6371.0
CENTRE = (50.0, 10.0)
HALF_SIDE_KM = 1500.0
NUM_SPECIES = 50
BLOB_STD_KM = (300.0, 800.0)
SEASON_DAYS = (60, 365)
YEARS = (2015, 2024)
TRAIN_RECORDS = 100_000
TEST_PHOTOS = 5_000
IMAGE_TOP1 = 0.60
SHIFT_KM = 50.0
SHIFT_DAYS = 15
TARGET_TRUE = 0.10
TARGET_SHIFTED = 0.08
# The share of the true prior's gain the built prior must reach, on each world at each size
GAIN_WORLDS = ("blobs", "shapes")
GAIN_RECORDS = (20_000, 60_000, 200_000)
GAIN_PHOTOS = 20_000
TARGET_SHARE = 0.85
RESULTS = Path(__file__).parent / "results" / "prior.json"


# ---------------------------------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------------------------------


def to_lat_lon(x_km: np.ndarray, y_km: np.ndarray, centre: tuple[float, float] = CENTRE) -> tuple[np.ndarray, ...]:
    """Planar (east, north) kilometres from ``centre`` -> latitude, longitude (inverse azimuthal equidistant)."""
    distance = np.hypot(x_km, y_km) / EARTH_RADIUS_KM
    bearing = np.arctan2(x_km, y_km)
    return destination(centre[0], centre[1], bearing, distance * EARTH_RADIUS_KM)


def destination(
    lat: np.ndarray, lon: np.ndarray, bearing: np.ndarray, km: np.ndarray | float
) -> tuple[np.ndarray, ...]:
    """The point ``km`` away from (lat, lon) along the great circle of initial ``bearing`` (radians from north)."""
    (phi1, lambda1) = (np.radians(lat), np.radians(lon))
    delta = np.asarray(km) / EARTH_RADIUS_KM
    phi2 = np.arcsin(np.sin(phi1) * np.cos(delta) + np.cos(phi1) * np.sin(delta) * np.cos(bearing))
    lambda2 = lambda1 + np.arctan2(
        np.sin(bearing) * np.sin(delta) * np.cos(phi1), np.cos(delta) - np.sin(phi1) * np.sin(phi2)
    )
    return (np.degrees(phi2), (np.degrees(lambda2) + 540.0) % 360.0 - 180.0)


@dataclass
class World:
    abundance: np.ndarray  # [species]
    blob_species: np.ndarray  # [blobs]
    blob_weight: np.ndarray  # [blobs], within its species
    blob_centre: np.ndarray  # [blobs, 2] km
    blob_std: np.ndarray  # [blobs] km
    season_start: np.ndarray  # [species] day 0..364
    season_length: np.ndarray  # [species] days

    @classmethod
    def generate(cls, seed: int = 0) -> World:
        rng = np.random.default_rng(seed)
        abundance = rng.lognormal(0.0, 1.0, NUM_SPECIES)
        (species, weights, centres, stds) = ([], [], [], [])
        for s in range(NUM_SPECIES):
            count = int(rng.integers(1, 4))
            species += [s] * count
            weights += list(rng.dirichlet(np.ones(count)))
            centres += list(rng.uniform(-HALF_SIDE_KM, HALF_SIDE_KM, (count, 2)))
            stds += list(rng.uniform(*BLOB_STD_KM, count))
        return cls(
            abundance / abundance.sum(),
            np.array(species),
            np.array(weights),
            np.array(centres),
            np.array(stds),
            rng.integers(0, 365, NUM_SPECIES),
            rng.integers(SEASON_DAYS[0], SEASON_DAYS[1] + 1, NUM_SPECIES),
        )

    def sample(self, count: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """``count`` sightings: species, planar place (km), latitude, longitude, day of the year (0-364) and date."""
        species = rng.choice(NUM_SPECIES, size=count, p=self.abundance)
        blob = np.empty(count, dtype=np.int64)
        for s in range(NUM_SPECIES):  # a blob of the species, by its weight
            mine = np.flatnonzero(species == s)
            blobs = np.flatnonzero(self.blob_species == s)
            blob[mine] = rng.choice(blobs, size=len(mine), p=self.blob_weight[blobs])
        xy = np.empty((count, 2))
        todo = np.arange(count)
        while len(todo):  # draw again the points that fall outside the square
            xy[todo] = (
                self.blob_centre[blob[todo]] + rng.standard_normal((len(todo), 2)) * self.blob_std[blob[todo], None]
            )
            todo = todo[np.abs(xy[todo]).max(axis=1) > HALF_SIDE_KM]
        day = (self.season_start[species] + rng.integers(0, self.season_length[species])) % 365
        year = rng.integers(YEARS[0], YEARS[1] + 1, count)
        dates = np.array([f"{y}-01-01" for y in range(YEARS[0], YEARS[1] + 1)], dtype="datetime64[D]")
        date = dates[year - YEARS[0]] + day.astype("timedelta64[D]")
        (lat, lon) = to_lat_lon(xy[:, 0], xy[:, 1])
        return {"species": species, "xy": xy, "lat": lat, "lon": lon, "day": day, "date": date}


def species_names() -> list[str]:
    return [f"Species {index:02d}" for index in range(NUM_SPECIES)]


def write_records(path: Path, sightings: dict[str, np.ndarray]) -> None:
    """A Darwin Core-style Parquet file, dates as text (as in a GBIF download)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = np.array(species_names(), dtype=object)
    table = pa.table(
        {
            "species": pa.array(names[sightings["species"]].tolist(), pa.string()),
            "decimalLatitude": sightings["lat"],
            "decimalLongitude": sightings["lon"],
            "eventDate": pa.array(sightings["date"].astype(str).tolist(), pa.string()),
        }
    )
    pq.write_table(table, path)


# ---------------------------------------------------------------------------------------------------------------------
# The simulated classifier
# ---------------------------------------------------------------------------------------------------------------------


def image_probabilities(
    species: np.ndarray, strength: float, rng: np.random.Generator, num_classes: int = NUM_SPECIES
) -> np.ndarray:
    logits = strength * np.eye(num_classes)[species] + rng.standard_normal((len(species), num_classes))
    scaled = strength * logits
    scaled -= scaled.max(axis=1, keepdims=True)
    probabilities = np.exp(scaled)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def strength_for_top1(target: float, seed: int, num_classes: int = NUM_SPECIES) -> float:
    """The signal strength ``a`` at which the simulated classifier's top-1 is ``target`` (bisection)."""
    rng = np.random.default_rng(seed)
    species = rng.integers(0, num_classes, 200_000)
    noise = rng.standard_normal((len(species), num_classes))
    (low, high) = (0.0, 10.0)
    for _ in range(40):
        middle = (low + high) / 2
        top1 = np.mean(np.argmax(middle * np.eye(num_classes)[species] + noise, axis=1) == species)
        (low, high) = (middle, high) if top1 < target else (low, middle)
    return (low + high) / 2


# ---------------------------------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------------------------------


def evaluate(prior: LocationPrior, photos: dict[str, np.ndarray], image: np.ndarray, lat, lon, date) -> dict:
    """Top-1 with the prior at the given places and dates, and the out_of_range flags."""
    truth = photos["species"]
    image_top = image.argmax(axis=1)
    vectors = prior.probabilities_many(np.asarray(lat), np.asarray(lon), day_bins_of(np.asarray(date)))
    adjusted_top = apply_prior(image, vectors, 1.0).argmax(axis=1)
    flags = np.array([bool(out_of_range(image[i], vectors[i])) for i in range(len(truth))])
    image_wrong = image_top != truth
    return {
        "top1": round(float(np.mean(adjusted_top == truth)), 4),
        "gain_points": round(100 * float(np.mean(adjusted_top == truth) - np.mean(~image_wrong)), 2),
        "out_of_range_rate": round(float(flags.mean()), 4),
        "out_of_range_image_wrong": round(float(image_wrong[flags].mean()), 4) if flags.any() else None,
        "out_of_range_of_correct": round(float(flags[~image_wrong].mean()), 4),
        "out_of_range_of_wrong": round(float(flags[image_wrong].mean()), 4),
    }


def accuracy_figures(workdir: Path, records: int, photos_count: int, seed: int) -> dict:
    world = World.generate(seed)
    rng = np.random.default_rng(seed + 1)
    path = workdir / "records.parquet"
    write_records(path, world.sample(records, rng))
    built = build_prior_file(path, species_names(), workdir / "prior.bpr")
    prior = load_prior(workdir / "prior.bpr")

    photos = world.sample(photos_count, np.random.default_rng(seed + 2))
    strength = strength_for_top1(IMAGE_TOP1, seed + 3)
    image = image_probabilities(photos["species"], strength, np.random.default_rng(seed + 4))
    image_top1 = float(np.mean(image.argmax(axis=1) == photos["species"]))

    shift_rng = np.random.default_rng(seed + 5)
    bearing = shift_rng.uniform(0, 2 * np.pi, photos_count)
    (shifted_lat, shifted_lon) = destination(photos["lat"], photos["lon"], bearing, SHIFT_KM)
    shifted_date = photos["date"] + (shift_rng.choice([-1, 1], photos_count) * SHIFT_DAYS).astype("timedelta64[D]")
    uniform_xy = shift_rng.uniform(-HALF_SIDE_KM, HALF_SIDE_KM, (photos_count, 2))
    (uniform_lat, uniform_lon) = to_lat_lon(uniform_xy[:, 0], uniform_xy[:, 1])

    return {
        "records": records,
        "photos": photos_count,
        "prior_build_s": round(built.seconds, 2),
        "prior_file_bytes": built.file_bytes,
        "image_only_top1": round(image_top1, 4),
        "true_place_and_day": evaluate(prior, photos, image, photos["lat"], photos["lon"], photos["date"]),
        "shifted_50km_15days": evaluate(prior, photos, image, shifted_lat, shifted_lon, shifted_date),
        "uniform_place": evaluate(prior, photos, image, uniform_lat, uniform_lon, photos["date"]),
    }


def scale_figures(workdir: Path, sizes: list[int], seed: int) -> list[dict]:
    """Build time (reading the file included) and prior file size, from Parquet and from tab-separated CSV."""
    import pyarrow.csv
    import pyarrow.parquet

    world = World.generate(seed)
    results = []
    for size in sizes:
        parquet = workdir / f"records_{size}.parquet"
        write_records(parquet, world.sample(size, np.random.default_rng(seed + size)))
        tsv = workdir / f"records_{size}.csv"  # as GBIF's "simple CSV" download: tab-separated
        options = pyarrow.csv.WriteOptions(delimiter="\t", quoting_style="none")
        pyarrow.csv.write_csv(pyarrow.parquet.read_table(parquet), tsv, write_options=options)
        for path in (parquet, tsv):
            built = build_prior_file(path, species_names(), workdir / f"prior_{size}_{path.suffix.lstrip('.')}.bpr")
            results.append(
                {
                    "records": size,
                    "format": path.suffix.lstrip("."),
                    "records_file_bytes": path.stat().st_size,
                    "build_s": round(built.seconds, 2),
                    "prior_file_bytes": built.file_bytes,
                    "cells": {str(r): len(level.cells) for (r, level) in built.prior.levels.items()},
                }
            )
            path.unlink()
    return results


def day_bins_of(dates: np.ndarray) -> np.ndarray:
    """The prior's day-of-year bin of each date (``datetime64[D]``), as :func:`birder.geo.season.day_bin_of_date`."""
    day_of_year = (dates - dates.astype("datetime64[Y]")).astype(np.int64) + 1
    years = dates.astype("datetime64[Y]").astype(np.int64) + 1970
    leap = (years % 4 == 0) & ((years % 100 != 0) | (years % 400 == 0))
    return day_bins(day_of_year, leap)


def top1_with(image: np.ndarray, prior: np.ndarray, truth: np.ndarray) -> float:
    """Top-1 of the photos with ``[photos, classes]`` prior vectors applied at strength 1 (decision step 4)."""
    adjusted = apply_prior(image, prior, 1.0)
    return float(np.mean(adjusted.argmax(axis=1) == truth))


def gain_figures(workdir: Path, world_name: str, records: int, photos_count: int, seed: int) -> dict:
    """The share of the true prior's gain that the built prior reaches: one world, one download of ``records``
    rows (GBIF-style: missing positions, (0, 0), coarse dates, absences, other species), ``photos_count`` photos
    at their true place and day."""
    from benchmarks.prior_worlds import BLOBS_MESS, SHAPES_MESS, WORLDS, write_download

    world = WORLDS[world_name](seed)
    (mess, suffix) = (BLOBS_MESS, ".csv") if world_name == "blobs" else (SHAPES_MESS, ".parquet")
    rng = np.random.default_rng(seed + 1)
    path = write_download(
        workdir / f"{world_name}_{records}{suffix}", world.sample_records(records, rng), world.all_names(), mess, rng
    )
    names = world.class_names()
    # One pair of files per world and download size: the benchmark's own outputs, never one run's onto another's
    (chosen_file, fixed_file) = (
        workdir / f"{world_name}_{records}_chosen.bpr",
        workdir / f"{world_name}_{records}_fixed.bpr",
    )
    built = build_prior_file(path, names, chosen_file, overwrite=True)
    fixed = build_prior_file(path, names, fixed_file, search=False, overwrite=True)  # the settings before the search
    path.unlink()
    chosen_prior = load_prior(chosen_file)

    (photos, truth_prior) = world.sample_photos(photos_count, np.random.default_rng(seed + 2))
    strength = strength_for_top1(IMAGE_TOP1, seed + 3, len(names))
    image = image_probabilities(photos.species, strength, np.random.default_rng(seed + 4), len(names))
    bins = day_bins_of(photos.date)

    def top1_of(prior: LocationPrior) -> float:
        return top1_with(image, prior.probabilities_many(photos.lat, photos.lon, bins), photos.species)

    image_top1 = float(np.mean(image.argmax(axis=1) == photos.species))
    true_top1 = top1_with(image, truth_prior, photos.species)
    (built_top1, fixed_top1) = (top1_of(chosen_prior), top1_of(fixed.prior))
    true_gain = true_top1 - image_top1
    return {
        "world": world_name,
        "records": records,
        "records_used": built.records.used,
        "photos": photos_count,
        "image_only_top1": round(image_top1, 4),
        "true_prior_top1": round(true_top1, 4),
        "built_prior_top1": round(built_top1, 4),
        "fixed_settings_top1": round(fixed_top1, 4),
        "true_gain_points": round(100 * true_gain, 2),
        "built_gain_points": round(100 * (built_top1 - image_top1), 2),
        "share_of_true_gain": round((built_top1 - image_top1) / true_gain, 4),
        "fixed_settings_share": round((fixed_top1 - image_top1) / true_gain, 4),
        "build_s": round(built.seconds, 2),
        "search_s": round(built.choice.seconds, 2) if built.choice is not None else None,
        "fixed_build_s": round(fixed.seconds, 2),
        "settings": describe_settings(chosen_prior.settings),
        "heldout_loglik": built.choice.chosen_loglik if built.choice is not None else None,
        "prior_file_bytes": built.file_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a smoke run: 5,000 records, 500 photos, no scale runs")
    parser.add_argument("--skip-scale", action="store_true", help="skip the 1 M / 5 M record builds")
    parser.add_argument("--skip-gain", action="store_true", help="skip the share of the true prior's gain")
    parser.add_argument("--worlds", nargs="+", default=list(GAIN_WORLDS), choices=GAIN_WORLDS, help="gain: worlds")
    parser.add_argument("--records", type=int, nargs="+", default=list(GAIN_RECORDS), help="gain: download rows")
    parser.add_argument("--output", type=Path, help=f"write the figures as JSON here (default {RESULTS})")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="birder-prior-bench-") as tmp:
        workdir = Path(tmp)
        (records, photos) = (5_000, 500) if args.tiny else (TRAIN_RECORDS, TEST_PHOTOS)
        report = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "accuracy": accuracy_figures(workdir, records, photos, seed=0),
        }
        if not args.skip_gain:
            (sizes, gain_photos) = ([5_000], 1_000) if args.tiny else (args.records, GAIN_PHOTOS)
            report["gain"] = [
                gain_figures(workdir, world, size, gain_photos, seed=0) for world in args.worlds for size in sizes
            ]
        if not (args.tiny or args.skip_scale):
            report["scale"] = scale_figures(workdir, [1_000_000, 5_000_000], seed=0)

    accuracy = report["accuracy"]
    report["targets"] = {
        "true_place_gain_>=10": accuracy["true_place_and_day"]["gain_points"] >= 100 * TARGET_TRUE,
        "shifted_gain_>=8": accuracy["shifted_50km_15days"]["gain_points"] >= 100 * TARGET_SHIFTED,
        "image_top1_0.60+-0.02": abs(accuracy["image_only_top1"] - IMAGE_TOP1) <= 0.02,
    }
    for row in report.get("gain", []):
        key = f"{row['world']}_{row['records']}_share_>={TARGET_SHARE}"
        report["targets"][key] = row["share_of_true_gain"] >= TARGET_SHARE
    text = json.dumps(report, indent=2)
    print(text)
    output = args.output if args.output is not None else (None if args.tiny else RESULTS)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    print(f"({time.perf_counter() - started:.0f} s)")
    raise SystemExit(code)
