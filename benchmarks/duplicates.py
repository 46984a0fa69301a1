"""Duplicates that are copies: pair precision and recall of ``birder-index duplicates`` on generated photos with
planted copies among many look-alike photos of the same class, and its time per 10,000 photos.

    python -m benchmarks.duplicates [--workdir DIR] [--output FILE]     # ~30 minutes on 2 busy cores (training)
    python -m benchmarks.duplicates --tiny                               # a smoke run

Two photo sets, generated differently (no photo comes from the web). The pixel test's thresholds
(:mod:`birder.search.pixels`) were chosen on the first; the second was only run once they were fixed.

- **objects** (tuning): the object classes of ``benchmarks.synthetic`` (16 classes: 8 shapes, 2 colour pairs), each
  drawn in many *families*: one background (a textured field) and a place; each member of a family is the same
  class on that background with fresh sensor noise and a few other strokes, the object drawn again (another
  rotation, colour jitter, detail), 90-110 % of its size and moved 4-12 % of the frame. Frames of 320 x 240,
  256 x 256 or 240 x 320, saved as JPEG (quality 92).
- **scenes** (check): camera-trap-like frames of 384 x 256 or 256 x 384 saved as PNG: per family a fixed
  background; each member has 1-3 small objects (3-10 % of the frame) of the family's two classes at new places,
  a lighting change of 80-120 % and fresh noise.

In both, a quarter of the photos get a planted copy (a sixth of those a second one): cropped by up to 5 % of each
side (split at random between its two ends), rescaled 0.7-1.3, brightness 90-110 %, saved as JPEG at quality
50-95. The true pairs are every two photos of one original (original and copy, two copies); a reported pair is any
two photos in one group; precision and recall are over pairs. The embeddings are those of a small ViT trained here
on the object classes (``birder.training``), indexed by ``birder-index build``'s own code: a classifier's
embeddings, which bring photos of a class together (the case where embedding similarity alone fails). The old
method (cosine >= 0.97, connected groups) is scored on the same index.

Time: the duplicate search on each set (candidate search, reading thumbnails, pixel comparisons, grouping), per
10,000 photos; and the reading of a camera-size JPEG (4000 x 3000) thumbnail (JPEG decoded at 1/8 scale), per
10,000 photos, which dominates on real collections.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance

from benchmarks.inference import machine_description, machine_label
from benchmarks.synthetic import class_name, make_class_folder, render_object, textured_background
from birder.io.atomic import atomic_write_path
from birder.search import pixels
from birder.search.build import IndexOptions, run_index
from birder.search.duplicates import connected_groups, near_pairs, read_thumbnails, search_duplicates
from birder.search.store import PhotoIndex
from birder.training.classification import TrainConfig, train_classifier

CLASSES = list(range(16))
BACKBONE = {"patch_size": 8, "hidden_dim": 64, "num_layers": 4, "num_heads": 4, "mlp_dim": 128}
MODEL_SIZE = 64
OLD_THRESHOLD = 0.97  # birder-index duplicates before copies were confirmed by pixels
TARGETS = {"precision": 0.98, "recall": 0.9}
# What a planted copy may have undergone
MAX_CROP = 0.05
SCALE = (0.7, 1.3)
BRIGHTNESS = (0.9, 1.1)
QUALITY = (50, 95)
# How a look-alike of the objects set differs from the others of its family: a move (share of the frame's shorter
# side) and a size
MOVE = (0.04, 0.12)
GROWTH = (0.9, 1.1)


@dataclass(frozen=True)
class Photo:
    path: str
    source: int  # photos of one source are copies of one another
    family: int  # look-alikes: one scene drawn again
    copy: bool


# ---------------------------------------------------------------------------------------------------------------------
# Photo sets
# ---------------------------------------------------------------------------------------------------------------------


def make_copy(
    image: Image.Image, cut: tuple[float, float, float, float], scale: float, brightness: float, quality: int
) -> Image.Image:
    """``image`` without the shares ``cut`` (left, right, top, bottom) of its sides, rescaled by ``scale``, its
    brightness times ``brightness``, JPEG-compressed at ``quality`` (decoded again)."""
    (width, height) = image.size
    box = (cut[0] * width, cut[2] * height, width - cut[1] * width, height - cut[3] * height)
    size = (max(16, round((box[2] - box[0]) * scale)), max(16, round((box[3] - box[1]) * scale)))
    copy = image.resize(size, Image.Resampling.BICUBIC, box=box)
    copy = ImageEnhance.Brightness(copy).enhance(brightness)
    buffer = io.BytesIO()
    copy.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def plant_copy(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A copy: cropped by up to 5 % of each side (split between its ends), rescaled, brightened, JPEG-compressed."""
    (cut_x, cut_y) = rng.uniform(0, MAX_CROP, size=2)
    (share_x, share_y) = rng.uniform(0, 1, size=2)
    cut = (cut_x * share_x, cut_x * (1 - share_x), cut_y * share_y, cut_y * (1 - share_y))
    (scale, brightness) = (rng.uniform(*SCALE), rng.uniform(*BRIGHTNESS))
    return make_copy(image, cut, scale, brightness, int(rng.integers(QUALITY[0], QUALITY[1] + 1)))


def _strokes(image: Image.Image, rng: np.random.Generator, count: int) -> None:
    draw = ImageDraw.Draw(image)
    (width, height) = image.size
    for _ in range(count):
        (x0, x1) = rng.integers(0, width, size=2)
        (y0, y1) = rng.integers(0, height, size=2)
        colour = tuple(int(c) for c in rng.integers(50, 210, size=3))
        draw.line((int(x0), int(y0), int(x1), int(y1)), fill=colour, width=int(rng.integers(1, 4)))


def _noisy(background: np.ndarray, rng: np.random.Generator, gain: float = 1.0) -> Image.Image:
    pixels_ = background * gain + rng.normal(0, 6, size=background.shape)
    return Image.fromarray(np.clip(pixels_, 0, 255).astype(np.uint8))


def object_family(class_id: int, members: int, rng: np.random.Generator) -> list[Image.Image]:
    """One scene drawn ``members`` times: same background and class, the object drawn again and moved."""
    (width, height) = [(320, 240), (256, 256), (240, 320)][int(rng.integers(0, 3))]
    background = np.asarray(textured_background((height, width), rng), dtype=np.float32)
    short = min(width, height)
    side = int(short * 0.6 * rng.uniform(0.85, 1.0))
    # The place leaves room for the largest move and size: a move is never clipped at the frame's edge
    reach = MOVE[1] * short + (GROWTH[1] - 1) * side
    place = rng.uniform([reach, reach], [width - side - reach, height - side - reach])
    photos = []
    for _ in range(members):
        image = _noisy(background, rng)
        _strokes(image, rng, 2)
        size = int(side * rng.uniform(*GROWTH))
        angle = rng.uniform(0, 2 * math.pi)
        shift = rng.uniform(*MOVE) * short
        x = round(place[0] + shift * math.cos(angle))
        y = round(place[1] + shift * math.sin(angle))
        drawn = render_object(class_id, size, rng)
        image.paste(drawn, (x, y), drawn)
        photos.append(image)
    return photos


def scene_family(classes: list[int], members: int, rng: np.random.Generator) -> list[Image.Image]:
    """A camera trap's frames: one background, 1-3 small objects at new places each time, the light changing."""
    (width, height) = [(384, 256), (256, 384)][int(rng.integers(0, 2))]
    background = np.asarray(textured_background((height, width), rng), dtype=np.float32)
    photos = []
    for _ in range(members):
        image = _noisy(background, rng, gain=rng.uniform(0.8, 1.2))
        for _ in range(int(rng.integers(1, 4))):
            side = round(math.sqrt(rng.uniform(0.03, 0.10) * width * height))
            (x, y) = (int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1)))
            drawn = render_object(int(rng.choice(classes)), side, rng)
            image.paste(drawn, (x, y), drawn)
        photos.append(image)
    return photos


def write_set(kind: str, root: Path, families: int, members: int, copy_share: float, seed: int) -> list[Photo]:
    """``root/<family>/<i>.(jpg|png)`` and the planted copies beside them; the photos with their truth."""
    rng = np.random.default_rng(seed)
    photos = []
    source = 0
    for family in range(families):
        if kind == "objects":
            drawn = object_family(CLASSES[family % len(CLASSES)], members, rng)
            (suffix, options) = (".jpg", {"quality": 92})
        else:
            drawn = scene_family([int(c) for c in rng.choice(CLASSES, size=2, replace=False)], members, rng)
            (suffix, options) = (".png", {})
        folder = root / f"{family:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for number, image in enumerate(drawn):
            path = folder / f"{number:02d}{suffix}"
            image.save(path, **options)
            photos.append(Photo(str(path), source, family, False))
            if rng.uniform() < copy_share:
                original = Image.open(path).convert("RGB")
                for copy_number in range(2 if rng.uniform() < 1 / 6 else 1):
                    copy_path = folder / f"{number:02d}_copy{copy_number}.jpg"
                    plant_copy(original, rng).save(copy_path, quality=100)  # already JPEG-compressed once
                    photos.append(Photo(str(copy_path), source, family, True))
            source += 1
    return photos


# ---------------------------------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------------------------------


def train_embedding_model(workdir: Path, per_class: int, epochs: int) -> tuple[Path, float]:
    """A small ViT classifier of the object classes, trained by birder's training code; its file and val top-1.

    Kept in ``workdir`` and reused by a later run with the same settings (training is most of the run's time).
    """
    settings = {"per_class": per_class, "epochs": epochs, "backbone": BACKBONE, "size": MODEL_SIZE}
    record = workdir / "embedding_model.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved["settings"] == settings and Path(saved["path"]).is_file():
            return (Path(saved["path"]), saved["val_top1"])
    data = workdir / "classifier_data"
    make_class_folder(data / "train", CLASSES, per_class, size=MODEL_SIZE, seed=100)
    make_class_folder(data / "val", CLASSES, max(2, per_class // 4), size=MODEL_SIZE, seed=101)
    result = train_classifier(
        TrainConfig(
            output_dir=workdir / "classifier",
            data_dir=data,
            network="vit_t16",
            model_config=BACKBONE,
            size=MODEL_SIZE,
            epochs=epochs,
            warmup_epochs=min(1, epochs - 1),
            batch_size=32,
            lr=3e-3,
            aug_level=1,
            workers=0,
            progress_bar=False,
        )
    )
    assert result.model_path is not None
    top1 = result.validation[epochs].top1
    record.write_text(json.dumps({"settings": settings, "path": str(result.model_path), "val_top1": top1}))
    return (result.model_path, top1)


def build(photos: list[Photo], model: Path, directory: Path) -> PhotoIndex:
    options = IndexOptions([p.path for p in photos], directory, weights=model, num_workers=0, progress=False)
    run_index(options, add=False)
    return PhotoIndex(directory)


# ---------------------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------------------


def true_pairs(photos: list[Photo], ids: dict[str, int]) -> set[tuple[int, int]]:
    by_source: dict[int, list[int]] = {}
    for photo in photos:
        by_source.setdefault(photo.source, []).append(ids[photo.path])
    return {(min(a, b), max(a, b)) for members in by_source.values() for (a, b) in combinations(members, 2)}


def group_pairs(groups: list[list[int]]) -> set[tuple[int, int]]:
    return {(min(a, b), max(a, b)) for members in groups for (a, b) in combinations(members, 2)}


def pair_scores(reported: set[tuple[int, int]], truth: set[tuple[int, int]]) -> dict[str, float | int]:
    hits = len(reported & truth)
    return {
        "reported_pairs": len(reported),
        "true_pairs": len(truth),
        "correct_pairs": hits,
        "precision": hits / len(reported) if reported else 1.0,
        "recall": hits / len(truth) if truth else 1.0,
    }


def distinct_removed(groups: list[list[int]], source_of: dict[int, int]) -> int:
    """Photos suggested for removal that are not a copy of their group's kept photo: what a user would lose."""
    return sum(source_of[member] != source_of[members[0]] for members in groups for member in members[1:])


def pixel_margin(index: PhotoIndex, report, truth: set[tuple[int, int]], total_true: int) -> dict:
    """The pixel test's figure on every pair compared, true copies against distinct photos: the margin."""
    is_true = np.array([(int(a), int(b)) in truth for (a, b) in report.compared_pairs], dtype=bool)
    (copies, distinct) = (report.block_difference[is_true], report.block_difference[~is_true])
    quantiles = (0.5, 0.9, 0.99)
    return {
        "candidate_pairs": report.candidates,
        "compared_pairs": report.compared,
        "true_pairs_compared": int(is_true.sum()),
        "true_pairs": total_true,
        "copies_block_difference": {
            "max": float(copies.max(initial=0)),
            **{f"q{int(q * 100)}": float(np.quantile(copies, q)) for q in quantiles if len(copies)},
        },
        "distinct_block_difference": {
            "min": float(distinct.min(initial=np.inf)),
            **{f"q{round(100 - q * 100)}": float(np.quantile(distinct, 1 - q)) for q in quantiles if len(distinct)},
        },
        "threshold": pixels.MAX_BLOCK_DIFFERENCE,
    }


def copy_ranks(vectors: np.ndarray, truth: set[tuple[int, int]]) -> dict:
    """Where a copy ranks among its original's nearest photos by ``vectors`` (unit rows; the better of the two
    directions): how many neighbours a search needs to find it."""
    pairs = sorted(truth)
    similarity = np.array([float(vectors[a] @ vectors[b]) for (a, b) in pairs])
    ranks = np.array(
        [
            1 + min(int((np.delete(vectors, x, axis=0) @ vectors[x] > s).sum()) for x in (a, b))
            for ((a, b), s) in zip(pairs, similarity, strict=True)
        ]
    )
    return {
        **{f"within_{k}": float((ranks <= k).mean()) for k in (1, 4, 16, 64)},
        "similarity_min": float(similarity.min()),
        "similarity_median": float(np.median(similarity)),
    }


def signature_vectors(index: PhotoIndex) -> np.ndarray:
    """Every photo's pixel signature (zeros where it cannot be read)."""
    (thumbnails, _) = read_thumbnails(dict(enumerate(index.photos.column("path").to_pylist())))
    vectors = np.zeros((len(index), pixels.SIGNATURE_CELLS**2), dtype=np.float32)
    for photo, thumbnail in thumbnails.items():
        vectors[photo] = thumbnail.signature
    return vectors


def evaluate(name: str, photos: list[Photo], index: PhotoIndex, args: argparse.Namespace) -> dict:
    ids = {path: i for (i, path) in enumerate(index.photos.column("path").to_pylist())}
    truth = true_pairs(photos, ids)
    source_of = {ids[p.path]: p.source for p in photos}

    (started, cpu_started) = (time.perf_counter(), time.process_time())
    report = search_duplicates(
        index, args.min_similarity, neighbours=args.neighbours, pixel_neighbours=args.pixel_neighbours
    )
    (seconds, cpu_seconds) = (time.perf_counter() - started, time.process_time() - cpu_started)
    groups = [group.members for group in report.groups]
    new = pair_scores(group_pairs(groups), truth)
    new["distinct_photos_suggested_for_removal"] = distinct_removed(groups, source_of)

    old_groups = connected_groups(near_pairs(index.vectors, OLD_THRESHOLD))
    old = pair_scores(group_pairs(old_groups), truth)
    # The old table kept the photo with most pixels; every other member of a group was marked for removal
    old["groups"] = len(old_groups)
    old["largest_group"] = max(map(len, old_groups), default=0)
    old["distinct_photos_suggested_for_removal"] = distinct_removed(old_groups, source_of)

    per_photo = seconds / len(index)
    result = {
        "photos": len(index),
        "originals": sum(not p.copy for p in photos),
        "copies": sum(p.copy for p in photos),
        "families": len({p.family for p in photos}),
        "pixel_confirmed": {
            **new,
            "groups": len(groups),
            "candidate_pairs": report.candidates,
            "compared_pairs": report.compared,
            "photos_read": report.photos_read,
            "seconds": seconds,
            "stage_seconds": report.seconds,
            "seconds_per_10000_photos": per_photo * 10_000,
            # CPU time of the process, all threads: what a machine that is not shared would take, about
            "cpu_seconds": cpu_seconds,
            "cpu_seconds_per_10000_photos": cpu_seconds / len(index) * 10_000,
        },
        f"embedding_only_cosine_{OLD_THRESHOLD}": old,
        "pixel_margin": pixel_margin(index, report, truth, len(truth)),
        "copies_rank_by_embedding": copy_ranks(index.embeddings(), truth),
        "copies_rank_by_pixel_signature": copy_ranks(signature_vectors(index), truth),
    }
    scores = result["pixel_confirmed"]
    print(
        f"{name}: {len(index)} photos ({result['copies']} planted copies, {len(truth)} true pairs); "
        f"precision {scores['precision']:.3f}, recall {scores['recall']:.3f}, "
        f"{scores['distinct_photos_suggested_for_removal']} distinct photos suggested for removal; "
        f"{report.candidates} candidate pairs, {report.compared} compared, {seconds:.1f} s "
        f"({per_photo * 10_000:.0f} s per 10,000 photos; CPU time {cpu_seconds / len(index) * 10_000:.0f} s)",
        flush=True,
    )
    print(
        f"  cosine >= {OLD_THRESHOLD} alone: precision {old['precision']:.3f}, recall {old['recall']:.3f}, "
        f"{old['distinct_photos_suggested_for_removal']} distinct photos suggested for removal "
        f"(largest group {old['largest_group']})",
        flush=True,
    )
    margin = result["pixel_margin"]
    (ranks, by_pixels) = (result["copies_rank_by_embedding"], result["copies_rank_by_pixel_signature"])
    print(
        f"  pixel test: copies' worst block up to {margin['copies_block_difference']['max']:.3f}, distinct photos' "
        f"from {margin['distinct_block_difference']['min']:.3f} (threshold {pixels.MAX_BLOCK_DIFFERENCE}); "
        f"{margin['true_pairs_compared']} of {len(truth)} true pairs compared; a copy is its original's nearest "
        f"(among 4, 16) by embedding for {ranks['within_1']:.0%} ({ranks['within_4']:.0%}, {ranks['within_16']:.0%}) "
        f"of the pairs, by pixel signature for {by_pixels['within_1']:.0%} ({by_pixels['within_4']:.0%}, "
        f"{by_pixels['within_16']:.0%})",
        flush=True,
    )
    return result


def camera_jpeg_seconds(workdir: Path, count: int) -> dict:
    """Median seconds to read a 4000 x 3000 JPEG (quality 90) into a thumbnail, and the full decode for scale."""
    from birder.io.images import load_image

    rng = np.random.default_rng(7)
    folder = workdir / "camera"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(count):
        path = folder / f"{number}.jpg"
        if not path.is_file():
            small = object_family(int(rng.integers(0, len(CLASSES))), 1, rng)[0]
            small.resize((4000, 3000), Image.Resampling.BICUBIC).save(path, quality=90)
        paths.append(path)
    thumbnail = []
    full = []
    thumbnail_cpu = []
    for path in paths:
        (started, cpu_started) = (time.perf_counter(), time.process_time())
        pixels.read_thumbnail(path)
        thumbnail.append(time.perf_counter() - started)
        thumbnail_cpu.append(time.process_time() - cpu_started)
        started = time.perf_counter()
        load_image(path)
        full.append(time.perf_counter() - started)
    median = statistics.median(thumbnail)
    return {
        "photos": count,
        "size": [4000, 3000],
        "thumbnail_seconds_median": median,
        "thumbnail_cpu_seconds_median": statistics.median(thumbnail_cpu),
        "full_decode_seconds_median": statistics.median(full),
        "thumbnails_seconds_per_10000_photos_one_thread": median * 10_000,
    }


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/results/duplicates_work"))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/duplicates.json"))
    parser.add_argument("--sets", nargs="+", default=["objects", "scenes"], choices=["objects", "scenes"])
    parser.add_argument("--min-similarity", type=float, default=None, help="default: birder-index duplicates'")
    parser.add_argument("--neighbours", type=int, default=None, help="default: birder-index duplicates'")
    parser.add_argument("--pixel-neighbours", type=int, default=None, help="default: birder-index duplicates'")
    parser.add_argument("--tiny", action="store_true", help="a smoke run: few photos, one training epoch")
    args = parser.parse_args(argv)
    from birder.search.duplicates import CANDIDATE_NEIGHBOURS, MIN_SIMILARITY, PIXEL_NEIGHBOURS

    args.min_similarity = MIN_SIMILARITY if args.min_similarity is None else args.min_similarity
    args.neighbours = CANDIDATE_NEIGHBOURS if args.neighbours is None else args.neighbours
    args.pixel_neighbours = PIXEL_NEIGHBOURS if args.pixel_neighbours is None else args.pixel_neighbours
    return args


# families, members, copy share, seed
SETS = {"objects": (80, 8, 0.25, 1), "scenes": (40, 12, 0.25, 2)}
TINY_SETS = {"objects": (4, 4, 0.5, 1), "scenes": (3, 4, 0.5, 2)}


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    torch.manual_seed(0)
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    (model, top1) = train_embedding_model(args.workdir, 8 if args.tiny else 80, 1 if args.tiny else 12)
    print(f"embedding model: vit_t16 {BACKBONE}, {MODEL_SIZE} px, val top-1 {top1:.3f}", flush=True)
    results = {}
    for name in args.sets:
        (families, members, share, seed) = (TINY_SETS if args.tiny else SETS)[name]
        root = args.workdir / name
        photos = write_set(name, root / "photos", families, members, share, seed)
        index_dir = root / "index"
        if index_dir.exists():
            import shutil

            shutil.rmtree(index_dir)
        results[name] = evaluate(name, photos, build(photos, model, index_dir), args)

    camera = camera_jpeg_seconds(args.workdir, 3 if args.tiny else 12)
    print(
        f"camera-size JPEG (4000 x 3000): thumbnail {camera['thumbnail_seconds_median'] * 1000:.0f} ms "
        f"(CPU {camera['thumbnail_cpu_seconds_median'] * 1000:.0f} ms) "
        f"(full decode {camera['full_decode_seconds_median'] * 1000:.0f} ms): "
        f"{camera['thumbnails_seconds_per_10000_photos_one_thread']:.0f} s per 10,000 photos on one thread",
        flush=True,
    )
    machine = machine_description(torch.device("cpu"))
    report = {
        "machine": machine,
        "machine_label": machine_label(machine),
        "settings": {
            "min_similarity": args.min_similarity,
            "neighbours": args.neighbours,
            "pixel_neighbours": args.pixel_neighbours,
            "max_block_difference": pixels.MAX_BLOCK_DIFFERENCE,
            "max_crop": pixels.MAX_CROP,
            "planted": {"max_crop": MAX_CROP, "scale": SCALE, "brightness": BRIGHTNESS, "jpeg_quality": QUALITY},
            "embedding_model": {"network": "vit_t16", "config": BACKBONE, "size": MODEL_SIZE, "val_top1": top1},
            "class_names": [class_name(c) for c in CLASSES],
        },
        "targets": TARGETS,
        "sets": results,
        "camera_jpeg": camera,
        "seconds": time.perf_counter() - started,
        "tiny": args.tiny,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write_path(args.output) as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=float) + "\n", encoding="utf-8")
    print(f"on {report['machine_label']}; written {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
