"""Generated worlds for the prior's gain benchmark, each with its true prior, and a GBIF-style download of records.

Two worlds built in different ways, so that the prior's automatic settings are not judged on the one they were
developed on:

- **Blobs** (:class:`BlobsWorld`, the project's world of ``benchmarks.prior``): 50 species on a 3,000 km square in
  central Europe, ranges of 1-3 round Gaussian blobs of 300-800 km, each species present in one window of 60-365
  days, the same everywhere; records drawn evenly from the world.
- **Shapes** (:class:`ShapesWorld`): 70 species on a 4,000 x 2,400 km rectangle centred on 38°N 100°W, ranges
  drawn on a 20 km raster as bands along winding lines (coasts, rivers), scattered patches (mountain tops),
  north or south of a soft boundary, rings (foothills round a basin) or everywhere but in a few holes; seasons of
  residents (mildly seasonal), summer and winter visitors, passage migrants (spring and autumn) and partial
  migrants, whose range itself changes with the season (the whole range in summer, its southern part in
  winter). Records are biased as observers are: effort around a dozen cities, more records in early summer, part
  of them snapped to hotspots or rounded to 0.1°, some duplicated, flocks counted for gregarious species.

Both write their records as a GBIF download would hold them (:func:`write_download`): positions missing or
(0, 0), dates with the year only, the month only or none, absences, names of species outside the model, names
with their authorship, individual counts. Test photos are drawn from the same world (and observer effort) with
exact positions and dates; the true prior is the world's p(species | place, day), observer effort cancelling.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree
from scipy.special import ndtr

EARTH_RADIUS_KM = 6371.0
DAYS = 365
YEARS = (2015, 2024)


def to_lat_lon(x_km: np.ndarray, y_km: np.ndarray, centre: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Planar (east, north) kilometres from ``centre`` -> latitude, longitude (inverse azimuthal equidistant)."""
    (phi1, lambda1) = (np.radians(centre[0]), np.radians(centre[1]))
    delta = np.hypot(x_km, y_km) / EARTH_RADIUS_KM
    bearing = np.arctan2(x_km, y_km)
    phi2 = np.arcsin(np.sin(phi1) * np.cos(delta) + np.cos(phi1) * np.sin(delta) * np.cos(bearing))
    lambda2 = lambda1 + np.arctan2(
        np.sin(bearing) * np.sin(delta) * np.cos(phi1), np.cos(delta) - np.sin(phi1) * np.sin(phi2)
    )
    return (np.degrees(phi2), (np.degrees(lambda2) + 540.0) % 360.0 - 180.0)


def dates_of(day: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A date in a random year of :data:`YEARS` on day-of-year ``day`` (0-based, 365-day years)."""
    year = rng.integers(YEARS[0], YEARS[1] + 1, len(day))
    first = np.array([f"{y}-01-01" for y in range(YEARS[0], YEARS[1] + 1)], dtype="datetime64[D]")
    return first[year - YEARS[0]] + np.asarray(day).astype("timedelta64[D]")


@dataclass
class Sightings:
    """Draws from a world: species (indices; names of the world's :meth:`all_names`), place and day."""

    species: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    day: np.ndarray  # 0 .. 364
    date: np.ndarray  # datetime64[D]
    count: np.ndarray | None = None  # individuals (None: one each)


# ---------------------------------------------------------------------------------------------------------------------
# Blobs: the project's world (benchmarks.prior.World), with species outside the model and its true prior
# ---------------------------------------------------------------------------------------------------------------------


class BlobsWorld:
    """``benchmarks.prior.World`` (the model's 50 species) plus 20 species outside the model drawn the same way."""

    name = "blobs"
    outside_share = 0.12  # of the records: species the model does not know

    def __init__(self, seed: int = 0) -> None:
        from benchmarks import prior as base

        self.base = base
        self.world = base.World.generate(seed)
        self.others = base.World.generate(seed + 1000)
        self.num_outside = 20

    def class_names(self) -> list[str]:
        return self.base.species_names()

    def all_names(self) -> list[str]:
        return self.class_names() + [f"Alius {index:02d}" for index in range(self.num_outside)]

    def _draw(self, world, count: int, rng: np.random.Generator) -> Sightings:
        drawn = world.sample(count, rng)
        return Sightings(drawn["species"], drawn["lat"], drawn["lon"], drawn["day"], drawn["date"])

    def sample_records(self, count: int, rng: np.random.Generator) -> Sightings:
        outside = rng.random(count) < self.outside_share
        inside = self._draw(self.world, int((~outside).sum()), rng)
        other = self._draw(self.others, int(outside.sum()), rng)
        other.species = len(self.class_names()) + other.species % self.num_outside
        return _concatenate([inside, other], rng)

    def sample_photos(self, count: int, rng: np.random.Generator) -> tuple[Sightings, np.ndarray]:
        drawn = self.world.sample(count, rng)
        photos = Sightings(drawn["species"], drawn["lat"], drawn["lon"], drawn["day"], drawn["date"])
        return (photos, self.true_prior(drawn["xy"], drawn["day"]))

    def true_prior(self, xy: np.ndarray, day: np.ndarray) -> np.ndarray:
        """``[points, 50]`` p(species | place, day): abundance x blob densities (each cut to the square, where its
        points are drawn again) x the season window's uniform density."""
        world = self.world
        half = self.base.HALF_SIDE_KM
        density = np.zeros((len(xy), len(world.abundance)))
        for blob in range(len(world.blob_species)):
            (centre, std) = (world.blob_centre[blob], world.blob_std[blob])
            inside = np.prod(ndtr((half - centre) / std) - ndtr((-half - centre) / std))
            squared = ((xy - centre) ** 2).sum(axis=1)
            gaussian = np.exp(-0.5 * squared / std**2) / (2 * np.pi * std**2)
            density[:, world.blob_species[blob]] += world.blob_weight[blob] * gaussian / inside
        in_season = (np.asarray(day)[:, None] - world.season_start[None, :]) % DAYS < world.season_length[None, :]
        joint = world.abundance[None, :] * density * in_season / world.season_length[None, :]
        return joint / joint.sum(axis=1, keepdims=True)


def _concatenate(parts: list[Sightings], rng: np.random.Generator) -> Sightings:
    order = rng.permutation(sum(len(part.species) for part in parts))
    counts = [part.count if part.count is not None else np.ones(len(part.species), np.int64) for part in parts]
    return Sightings(
        np.concatenate([part.species for part in parts])[order],
        np.concatenate([part.lat for part in parts])[order],
        np.concatenate([part.lon for part in parts])[order],
        np.concatenate([part.day for part in parts])[order],
        np.concatenate([part.date for part in parts])[order],
        np.concatenate(counts)[order],
    )


# ---------------------------------------------------------------------------------------------------------------------
# Shapes: a second world, built another way
# ---------------------------------------------------------------------------------------------------------------------

SHAPES_CENTRE = (38.0, -100.0)
SHAPES_HALF = (2000.0, 1200.0)  # half width (east-west) and half height (north-south), km
RASTER_KM = 20.0
SHAPES_SPECIES = 70
SHAPES_OUTSIDE = 25
_SYLLABLES = ("ca", "lo", "mi", "ra", "te", "nu", "pe", "si", "vo", "ta", "re", "gu", "an", "or", "il", "ex")


def _latin(rng: np.random.Generator, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES, parts))


class ShapesWorld:
    """See the module's docstring. Each species has one or two (range raster, season curve) components: its
    records at place x on day d have density ``sum_k share_k * range_k(x) * season_k(d)``; observers' effort
    ``e(x) g(d)`` multiplies every species alike, so it cancels from p(species | place, day)."""

    name = "shapes"

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        (half_x, half_y) = SHAPES_HALF
        self.nx = int(2 * half_x / RASTER_KM)
        self.ny = int(2 * half_y / RASTER_KM)
        xs = -half_x + RASTER_KM * (np.arange(self.nx) + 0.5)
        ys = -half_y + RASTER_KM * (np.arange(self.ny) + 0.5)
        (self.gx, self.gy) = np.meshgrid(xs, ys)  # [ny, nx]
        total = SHAPES_SPECIES + SHAPES_OUTSIDE
        names = set()
        while len(names) < total:
            names.add(f"{_latin(rng, 2).capitalize()} {_latin(rng, 3)}")
        self.names = sorted(names)
        rng.shuffle(self.names)
        ranks = rng.permutation(total) + 1
        self.abundance = ranks**-0.9 / np.sum(ranks**-0.9)  # Zipf-like, unlike the blobs' log-normal
        self.gregarious = rng.random(total) < 0.15  # counted in flocks
        days = np.arange(DAYS)
        self.effort_days = 1.0 + 0.6 * np.cos(2 * np.pi * (days - 150) / DAYS)  # observers like early summer
        self.effort = self._effort(rng)
        (self.component_species, self.component_share, self.rasters, self.seasons) = ([], [], [], [])
        for species in range(total):
            for share, raster, season in self._species(rng, days):
                self.component_species.append(species)
                self.component_share.append(share)
                self.rasters.append(raster / raster.sum())
                self.seasons.append(season / season.sum())
        self.component_species = np.array(self.component_species)
        self.component_share = np.array(self.component_share)
        self.rasters = np.array(self.rasters)  # [components, ny, nx]
        self.seasons = np.array(self.seasons)  # [components, days]
        # Where recorders are: cities' hotspots, drawn from the effort
        cells = rng.choice(self.effort.size, size=400, p=(self.effort / self.effort.sum()).ravel())
        self.hotspots = np.c_[self.gx.ravel()[cells], self.gy.ravel()[cells]] + rng.uniform(-10, 10, (400, 2))

    # -- building ---------------------------------------------------------------------------------------------------

    def _effort(self, rng: np.random.Generator) -> np.ndarray:
        effort = np.full(self.gx.shape, 0.15)
        for _ in range(12):
            (cx, cy) = (rng.uniform(-SHAPES_HALF[0], SHAPES_HALF[0]), rng.uniform(-SHAPES_HALF[1], SHAPES_HALF[1]))
            spread = rng.uniform(50, 200)
            effort += rng.lognormal(0, 0.7) * np.exp(-0.5 * ((self.gx - cx) ** 2 + (self.gy - cy) ** 2) / spread**2)
        return effort

    def _point(self, rng: np.random.Generator) -> np.ndarray:
        return np.array([rng.uniform(-SHAPES_HALF[0], SHAPES_HALF[0]), rng.uniform(-SHAPES_HALF[1], SHAPES_HALF[1])])

    def _range(self, rng: np.random.Generator) -> np.ndarray:
        kind = rng.choice(["band", "patches", "north_south", "ring", "holes"], p=[0.3, 0.2, 0.2, 0.1, 0.2])
        (gx, gy) = (self.gx, self.gy)
        if kind == "band":  # along a winding line
            points = [self._point(rng)]
            heading = rng.uniform(0, 2 * np.pi)
            for _ in range(rng.integers(4, 7)):
                heading += rng.normal(0, 0.6)
                points.append(points[-1] + rng.uniform(300, 700) * np.array([np.cos(heading), np.sin(heading)]))
            width = rng.uniform(40, 150)
            distance = np.full(gx.shape, np.inf)
            for start, end in itertools.pairwise(points):
                segment = end - start
                t = np.clip(((gx - start[0]) * segment[0] + (gy - start[1]) * segment[1]) / (segment @ segment), 0, 1)
                distance = np.minimum(
                    distance, np.hypot(gx - start[0] - t * segment[0], gy - start[1] - t * segment[1])
                )
            return np.exp(-0.5 * (distance / width) ** 2) + 1e-12
        if kind == "patches":  # mountain tops, islands
            raster = np.zeros(gx.shape)
            anchor = self._point(rng)
            for _ in range(rng.integers(3, 9)):
                centre = anchor + rng.normal(0, 600, 2) if rng.random() < 0.7 else self._point(rng)
                spread = rng.uniform(30, 120)
                raster += rng.uniform(0.5, 1) * np.exp(
                    -0.5 * ((gx - centre[0]) ** 2 + (gy - centre[1]) ** 2) / spread**2
                )
            return raster + 1e-12
        if kind == "north_south":  # one side of a soft boundary, tilted
            boundary = rng.uniform(-800, 800)
            tilt = rng.uniform(-0.3, 0.3)
            side = rng.choice([-1, 1])
            z = side * (gy - boundary - tilt * gx) / rng.uniform(100, 300)
            return 1 / (1 + np.exp(-z)) * (1 + 0.5 * gx / SHAPES_HALF[0] * rng.uniform(-1, 1))
        if kind == "ring":  # foothills round a basin
            centre = self._point(rng) * 0.6
            radius = rng.uniform(400, 1000)
            width = rng.uniform(80, 200)
            return np.exp(-0.5 * ((np.hypot(gx - centre[0], gy - centre[1]) - radius) / width) ** 2) + 1e-12
        raster = np.ones(gx.shape)  # everywhere but in a few holes
        for _ in range(rng.integers(2, 5)):
            centre = self._point(rng)
            spread = rng.uniform(150, 400)
            raster *= 1 - 0.95 * np.exp(-0.5 * ((gx - centre[0]) ** 2 + (gy - centre[1]) ** 2) / spread**2)
        return raster

    @staticmethod
    def _peak(days: np.ndarray, centre: float, concentration: float) -> np.ndarray:
        return np.exp(concentration * np.cos(2 * np.pi * (days - centre) / DAYS))

    def _species(self, rng: np.random.Generator, days: np.ndarray) -> list[tuple[float, np.ndarray, np.ndarray]]:
        """The species' (share, range raster, season curve) components."""
        raster = self._range(rng)
        kind = rng.choice(["resident", "summer", "winter", "passage", "partial"], p=[0.25, 0.25, 0.1, 0.15, 0.25])
        if kind == "resident":
            season = 1 + rng.uniform(0, 0.3) * np.cos(2 * np.pi * (days - rng.uniform(0, DAYS)) / DAYS)
        elif kind == "summer":
            season = self._peak(days, rng.uniform(150, 200), rng.uniform(2, 8))
        elif kind == "winter":
            season = self._peak(days, rng.uniform(-20, 40), rng.uniform(2, 6))
        elif kind == "passage":
            season = self._peak(days, rng.uniform(100, 130), rng.uniform(5, 15))
            season += rng.uniform(0.5, 1.5) * self._peak(days, rng.uniform(250, 290), rng.uniform(5, 15))
        else:  # partial migrant: the whole range in summer, its southern part in winter
            summer = 1 / (1 + np.exp(-4 * np.cos(2 * np.pi * (days - rng.uniform(160, 190)) / DAYS)))
            rows = raster.sum(axis=1)
            median_y = self.gy[:, 0][np.searchsorted(np.cumsum(rows) / rows.sum(), 0.5)]
            south = raster * (1 / (1 + np.exp((self.gy - median_y) / 150)))
            return [(summer.mean(), raster, summer), (1 - summer.mean(), south + 1e-12, 1 - summer + 1e-9)]
        return [(1.0, raster, season)]

    # -- drawing -----------------------------------------------------------------------------------------------------

    def class_names(self) -> list[str]:
        return self.names[:SHAPES_SPECIES]

    def all_names(self) -> list[str]:
        return self.names

    def _draw(self, count: int, rng: np.random.Generator, species_limit: int) -> tuple[Sightings, np.ndarray]:
        """``count`` sightings of species below ``species_limit`` where and when observers look, and their
        planar places."""
        keep = self.component_species < species_limit
        spatial = (self.rasters[keep] * self.effort).reshape(keep.sum(), -1)
        temporal = self.seasons[keep] * self.effort_days
        weight = (
            self.abundance[self.component_species[keep]]
            * self.component_share[keep]
            * spatial.sum(axis=1)
            * temporal.sum(axis=1)
        )
        component = rng.choice(keep.sum(), size=count, p=weight / weight.sum())
        (cell, day) = (np.empty(count, np.int64), np.empty(count, np.int64))
        for k in np.unique(component):
            mine = np.flatnonzero(component == k)
            cell[mine] = rng.choice(spatial.shape[1], size=len(mine), p=spatial[k] / spatial[k].sum())
            day[mine] = rng.choice(DAYS, size=len(mine), p=temporal[k] / temporal[k].sum())
        xy = np.c_[self.gx.ravel()[cell], self.gy.ravel()[cell]] + rng.uniform(-0.5, 0.5, (count, 2)) * RASTER_KM
        species = self.component_species[keep][component]
        (lat, lon) = to_lat_lon(xy[:, 0], xy[:, 1], SHAPES_CENTRE)
        return (Sightings(species, lat, lon, day, dates_of(day, rng)), xy)

    def sample_records(self, count: int, rng: np.random.Generator) -> Sightings:
        """Records as observers make them: hotspots, rounded positions, duplicates, flocks."""
        unique = round(count / 1.05)
        (drawn, xy) = self._draw(unique, rng, len(self.names))
        # A share goes to the nearest hotspot when one is within 25 km (the place a checklist is filed under)
        (distance, nearest) = cKDTree(self.hotspots).query(xy)
        close = distance < 25
        snap = close & (rng.random(unique) < 0.35)
        xy[snap] = self.hotspots[nearest[snap]]
        (drawn.lat, drawn.lon) = to_lat_lon(xy[:, 0], xy[:, 1], SHAPES_CENTRE)
        rounded = rng.random(unique) < 0.2  # generalised to 0.1 degree
        drawn.lat[rounded] = np.round(drawn.lat[rounded], 1)
        drawn.lon[rounded] = np.round(drawn.lon[rounded], 1)
        flock = self.gregarious[drawn.species] & (rng.random(unique) < 0.5)
        drawn.count = np.where(flock, rng.geometric(0.2, unique), 1)
        duplicate = rng.choice(unique, size=count - unique, replace=False)  # the same record from two datasets
        rows = np.r_[np.arange(unique), duplicate]
        return Sightings(
            drawn.species[rows], drawn.lat[rows], drawn.lon[rows], drawn.day[rows], drawn.date[rows], drawn.count[rows]
        )

    def sample_photos(self, count: int, rng: np.random.Generator) -> tuple[Sightings, np.ndarray]:
        (photos, xy) = self._draw(count, rng, SHAPES_SPECIES)
        return (photos, self.true_prior(xy, photos.day))

    def true_prior(self, xy: np.ndarray, day: np.ndarray) -> np.ndarray:
        """``[points, 70]`` p(species | place, day) (observer effort, the same for every species, cancels)."""
        column = np.clip(((xy[:, 0] + SHAPES_HALF[0]) // RASTER_KM).astype(int), 0, self.nx - 1)
        row = np.clip(((xy[:, 1] + SHAPES_HALF[1]) // RASTER_KM).astype(int), 0, self.ny - 1)
        keep = np.flatnonzero(self.component_species < SHAPES_SPECIES)
        joint = np.zeros((len(xy), SHAPES_SPECIES))
        for k in keep:
            species = self.component_species[k]
            share = self.abundance[species] * self.component_share[k]
            joint[:, species] += share * self.rasters[k][row, column] * self.seasons[k][day]
        return joint / joint.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------------------------------
# The download
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mess:
    """Shares of the records with each problem of a real download."""

    no_position: float
    zero_zero: float
    year_only: float
    month_only: float
    no_date: float
    absences: float
    authorship: float  # the name in scientificName with its author, the species column empty


BLOBS_MESS = Mess(
    no_position=0.04, zero_zero=0.02, year_only=0.08, month_only=0.04, no_date=0.03, absences=0.03, authorship=0.2
)
SHAPES_MESS = Mess(
    no_position=0.06, zero_zero=0.01, year_only=0.12, month_only=0.06, no_date=0.02, absences=0.05, authorship=0.4
)


def write_download(path: Path, sightings: Sightings, names: list[str], mess: Mess, rng: np.random.Generator) -> Path:
    """The sightings as a GBIF download: tab-separated "simple CSV" (``.csv``) or Parquet, every value as text."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    count = len(sightings.species)
    all_names = np.array(names, dtype=object)
    name = all_names[sightings.species]
    lat = np.char.mod("%.5f", sightings.lat).astype(object)
    lon = np.char.mod("%.5f", sightings.lon).astype(object)
    date = sightings.date.astype(str).astype(object)
    individuals = np.where(rng.random(count) < 0.6, "", sightings.count if sightings.count is not None else 1)
    individuals = individuals.astype(str).astype(object)
    status = np.full(count, "PRESENT", dtype=object)

    problem = rng.random(count)
    edges = np.cumsum([mess.no_position, mess.zero_zero, mess.absences])
    lat[problem < edges[0]] = ""
    lon[problem < edges[0]] = ""
    zero = (problem >= edges[0]) & (problem < edges[1])
    (lat[zero], lon[zero]) = ("0", "0")
    absent = (problem >= edges[1]) & (problem < edges[2])  # an absence: somewhere, of any species, count 0
    name[absent] = all_names[rng.integers(0, len(names), int(absent.sum()))]
    (individuals[absent], status[absent]) = ("0", "ABSENT")

    when = rng.random(count)
    date_edges = np.cumsum([mess.year_only, mess.month_only, mess.no_date])
    year_only = when < date_edges[0]
    date[year_only] = np.array([text[:4] for text in date[year_only]], dtype=object)
    month_only = (when >= date_edges[0]) & (when < date_edges[1])
    date[month_only] = np.array([text[:7] for text in date[month_only]], dtype=object)
    date[(when >= date_edges[1]) & (when < date_edges[2])] = ""

    species_column = name.copy()
    scientific = name.copy()
    authored = rng.random(count) < mess.authorship
    scientific[authored] = np.array(
        [
            f"{text} (Auctor, {1758 + i % 200})"
            for (i, text) in zip(np.flatnonzero(authored), name[authored], strict=True)
        ],
        dtype=object,
    )
    species_column[authored] = ""
    table = pa.table(
        {
            "gbifID": pa.array([str(1_000_000 + i) for i in range(count)], pa.string()),
            "species": pa.array(species_column.tolist(), pa.string()),
            "scientificName": pa.array(scientific.tolist(), pa.string()),
            "decimalLatitude": pa.array(lat.tolist(), pa.string()),
            "decimalLongitude": pa.array(lon.tolist(), pa.string()),
            "eventDate": pa.array(date.tolist(), pa.string()),
            "individualCount": pa.array(individuals.tolist(), pa.string()),
            "occurrenceStatus": pa.array(status.tolist(), pa.string()),
        }
    )
    if path.suffix == ".parquet":
        pyarrow.parquet.write_table(table, path)
    else:
        options = pyarrow.csv.WriteOptions(delimiter="\t", quoting_style="none")
        pyarrow.csv.write_csv(table, path, write_options=options)
    return path


WORLDS = {"blobs": BlobsWorld, "shapes": ShapesWorld}
