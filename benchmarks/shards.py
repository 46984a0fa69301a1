"""Packing and streaming throughput: photos read for training from WebDataset shards against the same photos read
from folders.

    python -m benchmarks.shards                         # 2,000 photos of 800x600 (about 2 minutes on 2 cores)
    python -m benchmarks.shards --photos 200 --tiny     # a quick check

Generated JPEG photos (smooth colour fields with noise, 800x600, quality 90: about 100-150 KB each, like a
resized field photo) in an ImageFolder layout of 10 classes. Measured, each after one untimed warm-up pass so that
both sides read from the page cache (this benchmark measures the CPU cost of the two paths; on a shared network
file system the folder path's per-file opens are what shards remove, which a local disk does not show):

- packing: photos/s of ``python -m birder.tools pack`` (each photo read, checked by decoding, written to a tar);
- raw reading: photos/s and MB/s of getting the bytes of every photo, one file at a time against streaming tars;
- training input: images/s of a whole epoch of the trainers' loaders (decode, random resized crop to 224, flip,
  normalise, batches of 64), :class:`~birder.training.setup.IndexedEpochs` over the folders against
  :class:`~birder.data.shards.ShardStream`, with 0 and 2 loader workers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from birder.data.packing import pack, pack_source
from birder.data.shards import ShardStream, open_shards, read_shard_records
from birder.data.training import EpochSampler, ImageDataset, image_folder_files, training_transform
from birder.data.transforms import RGB_STATS
from birder.inference.optimize import cpu_model
from birder.io.atomic import atomic_write_text
from birder.training.setup import IndexedEpochs

CLASSES = 10
RESULTS = Path(__file__).parent / "results" / "shards.json"


def make_photos(root: Path, count: int, size: tuple[int, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (width, height) = size
    (yy, xx) = np.mgrid[0:height, 0:width]
    for number in range(count):
        folder = root / f"species_{number % CLASSES:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (a, b, c) = rng.uniform(0, 255, 3)
        field = np.stack(
            [a + 60 * np.sin(xx / rng.uniform(30, 90)), b + 60 * np.cos(yy / rng.uniform(30, 90)), c + 0 * xx], -1
        )
        pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{number:06d}.jpg", quality=90)
    return root


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def epoch_loader(kind: str, photos: Path, shards: Path, workers: int, batch_size: int, size: int):
    transform = training_transform((size, size), RGB_STATS["birder"], level=1)
    if kind == "shards":
        stream = ShardStream(open_shards(shards), transform, batch_size=batch_size, shuffle_buffer=1000)
        return stream.loader(1, 0, workers, torch.device("cpu"))

    files = image_folder_files(photos)
    dataset = ImageDataset(files.paths, transform, files.targets)
    return IndexedEpochs(dataset, EpochSampler(len(dataset)), batch_size).loader(1, 0, workers, torch.device("cpu"))


def one_epoch(loader) -> int:
    return sum(batch.images.shape[0] for batch in loader)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--tiny", action="store_true", help="160x120 photos, 32 px crops (a quick check)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, help="where the photos and shards go (default: a temporary folder)")
    args = parser.parse_args(argv)
    (photo_size, crop) = ((160, 120), 32) if args.tiny else ((800, 600), 224)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        photos = make_photos(work / "photos", args.photos, photo_size)
        source = pack_source([photos], "folders")
        megabytes = sum(path.stat().st_size for path in source.paths) / 1e6
        pack_s = timed(lambda: pack(source, work / "shards", shard_size=64 * 10**6, progress_bar=False))
        shard_set = open_shards(work / "shards")

        def read_files() -> None:
            for path in source.paths:
                path.read_bytes()

        def read_shards() -> None:
            for shard in shard_set.shards:
                for _ in read_shard_records(shard):
                    pass

        read_files()  # warm-up: both sides from the page cache
        read_shards()
        raw = {"folders": timed(read_files), "shards": timed(read_shards)}
        loaders = {}
        for workers in args.workers:
            for kind in ("folders", "shards"):
                one_epoch(epoch_loader(kind, photos, work / "shards", workers, 64, crop))  # warm-up
                seconds = timed(
                    lambda k=kind, w=workers: one_epoch(epoch_loader(k, photos, work / "shards", w, 64, crop))
                )
                loaders[f"{kind}, {workers} workers"] = args.photos / seconds

    report = {
        "machine": {"cpu_model": cpu_model(), "threads": torch.get_num_threads()},
        "photos": args.photos,
        "photo_size": list(photo_size),
        "megabytes": round(megabytes, 1),
        "shards": len(shard_set.shards),
        "pack_photos_per_s": args.photos / pack_s,
        "raw_read_photos_per_s": {kind: args.photos / seconds for kind, seconds in raw.items()},
        "raw_read_mb_per_s": {kind: megabytes / seconds for kind, seconds in raw.items()},
        "training_input_images_per_s": loaders,
    }
    atomic_write_text(args.output, json.dumps(report, indent=1) + "\n")
    print(f"{args.photos} photos ({megabytes:.0f} MB, {photo_size[0]}x{photo_size[1]} JPEG) on {cpu_model()}")
    print(f"  pack: {report['pack_photos_per_s']:.0f} photos/s into {len(shard_set.shards)} shards")
    for kind in ("folders", "shards"):
        rate = report["raw_read_photos_per_s"][kind]
        print(f"  raw read from {kind}: {rate:.0f} photos/s, {report['raw_read_mb_per_s'][kind]:.0f} MB/s")
    for name, rate in loaders.items():
        print(f"  training input ({crop} px crops), {name}: {rate:.1f} images/s")
    print(f"  wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
