"""birder-index duplicates: copies confirmed by pixels, distinct look-alikes never grouped, no chaining, the table
says why, unreadable photos listed; nothing deleted.

Indexes are written straight from chosen embeddings (no model): the embeddings only find candidates, so the tests
give look-alikes the embeddings a classifier would (identical or nearly), and copies ones that moved.
"""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.duplicates import make_copy, object_family, plant_copy
from birder.io.table_files import read_csv_table
from birder.scripts import index as index_script
from birder.search import duplicates, pixels
from birder.search.duplicates import find_duplicates, search_duplicates, signature_pairs, star_groups
from birder.search.pixels import Thumbnail
from birder.search.store import IndexInfo, PhotoIndex, PhotoRecord, write_info, write_photos
from birder.search.vectors import VECTORS_FILE, build_index, choose_plan, normalize

pytest.importorskip("faiss")
DIM = 16
OLD_THRESHOLD = 0.97  # birder-index duplicates' default before the pixels decided


def write_index(directory: Path, paths: list[Path], vectors: np.ndarray) -> PhotoIndex:
    """An index folder as ``birder-index build`` writes it, with these embeddings."""
    directory.mkdir(parents=True)
    records = [
        PhotoRecord(str(path), vector.astype(np.float32), None, None, None, "disc_0", 0.9)
        for (path, vector) in zip(paths, vectors, strict=True)
    ]
    total = write_photos(directory, vectors.shape[1], 0, records)
    index = build_index(np.load(directory / VECTORS_FILE, mmap_mode="r"), choose_plan(total, vectors.shape[1]))
    index.save(directory)
    write_info(directory, IndexInfo("test-model", {"name": "test"}, {}, vectors.shape[1], total, index.plan))
    return PhotoIndex(directory)


def moved(vector: np.ndarray, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector at exactly ``cosine`` from unit ``vector``."""
    other = rng.standard_normal(vector.shape)
    other -= (other @ vector) * vector
    other /= np.linalg.norm(other)
    return cosine * vector + np.sqrt(1 - cosine**2) * other


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> list[Image.Image]:
    """Four look-alikes: one background, the same class drawn again and moved a little each time."""
    return object_family(3, 4, np.random.default_rng(5))


def save(image: Image.Image, path: Path) -> Path:
    image.save(path, quality=92)
    return path


def test_a_cropped_rescaled_recompressed_copy_is_confirmed(scene, tmp_path: Path, monkeypatch) -> None:
    original = save(scene[0], tmp_path / "original.jpg")
    # 3 % off the left, 2 % off the right, 4 % off the top; 80 % of the size, 8 % brighter, JPEG quality 55
    copy = save(make_copy(scene[0], (0.03, 0.02, 0.04, 0.0), 0.8, 1.08, 55), tmp_path / "copy.jpg")
    unrelated = save(scene[1], tmp_path / "unrelated.jpg")
    rng = np.random.default_rng(0)
    vector = normalize(rng.standard_normal((1, DIM)))[0]
    # The copy's embedding moved below the old threshold (the copies were found at 0.55 recall)
    vectors = np.stack([vector, moved(vector, 0.92, rng), moved(vector, 0.0, rng)])
    index = write_index(tmp_path / "index", [original, copy, unrelated], vectors)

    # Only the embeddings' candidates: only their photos are read
    report = search_duplicates(index, pixel_neighbours=0)
    assert (report.photos_read, report.candidates, report.confirmed) == (2, 1, 1)
    reads = []
    monkeypatch.setattr(duplicates, "read_thumbnail", lambda path: reads.append(path) or pixels.read_thumbnail(path))
    assert search_duplicates(index).photos_read == 3  # with pixel signatures: every photo, once
    assert sorted(reads) == sorted(map(str, (original, copy, unrelated)))
    groups = find_duplicates(index)
    assert [index.rows(g.members)[0]["path"] for g in groups] == [str(original)]  # most pixels kept
    (evidence,) = groups[0].evidence[1:]
    assert evidence.block_difference <= pixels.MAX_BLOCK_DIFFERENCE
    assert evidence.similarity == pytest.approx(0.92, abs=1e-4)
    # The alignment found the crop (the kept photo's edges the copy lacks), to within the search's steps
    assert np.allclose(evidence.crop, (0.03, 0.02, 0.04, 0.0), atol=0.011)


def test_planted_copies_pass_and_look_alikes_fail_the_pixel_test(scene, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    paths = [save(image, tmp_path / f"{n}.jpg") for (n, image) in enumerate(scene)]
    copies = [save(plant_copy(scene[n % 4], rng), tmp_path / f"copy_{n}.jpg") for n in range(8)]
    thumbs = {p: pixels.read_thumbnail(p).grey for p in paths + copies}
    copy_pairs = [(paths[n % 4], copies[n]) for n in range(8)]
    look_alike_pairs = [(paths[a], paths[b]) for a in range(4) for b in range(a + 1, 4)]
    for pairs, expected in ((copy_pairs, True), (look_alike_pairs, False)):
        result = pixels.compare_thumbnails([thumbs[a] for a, _ in pairs], [thumbs[b] for _, b in pairs])
        assert result.is_copy.tolist() == [expected] * len(pairs), result.block_difference


def test_distinct_look_alikes_are_never_grouped(scene, tmp_path: Path) -> None:
    paths = [save(image, tmp_path / f"{n}.jpg") for (n, image) in enumerate(scene)]
    copy = save(make_copy(scene[2], (0.0, 0.04, 0.01, 0.01), 1.2, 0.95, 70), tmp_path / "copy_of_2.jpg")
    rng = np.random.default_rng(2)
    vector = normalize(rng.standard_normal((1, DIM)))[0]
    # A classifier's embeddings: every photo of the class above the old threshold, the look-alikes closer to each
    # other than the copy is to its original
    vectors = np.stack([moved(vector, 0.999, rng) for _ in paths] + [moved(vector, 0.985, rng)])
    index = write_index(tmp_path / "index", [*paths, copy], vectors)
    assert (index.embeddings() @ index.embeddings().T >= OLD_THRESHOLD).all()  # one group, before

    groups = find_duplicates(index, OLD_THRESHOLD)
    assert [sorted(index.rows(g.members)[i]["path"] for i in range(2)) for g in groups] == [
        sorted([str(paths[2]), str(copy)])
    ]
    assert len(groups[0].members) == 2


def test_groups_are_never_chained(scene, tmp_path: Path) -> None:
    # B lacks 4.5 % of A's left side, C another 4.5 % of B's: A~B and B~C are copies, A and C are 9 % apart
    a = save(scene[1], tmp_path / "a.jpg")
    b_image = make_copy(scene[1], (0.045, 0.0, 0.0, 0.0), 0.95, 1.0, 90)
    b = save(b_image, tmp_path / "b.jpg")
    c = save(make_copy(b_image, (0.045, 0.0, 0.0, 0.0), 0.95, 1.0, 90), tmp_path / "c.jpg")
    (ta, tb, tc) = (pixels.read_thumbnail(p).grey for p in (a, b, c))
    assert pixels.compare_thumbnails([ta, tb, ta], [tb, tc, tc]).is_copy.tolist() == [True, True, False]

    rng = np.random.default_rng(3)
    vector = normalize(rng.standard_normal((1, DIM)))[0]
    index = write_index(tmp_path / "index", [a, b, c], np.stack([moved(vector, 0.99, rng) for _ in range(3)]))
    groups = find_duplicates(index)
    # A has the most pixels: kept, with B; C is a copy of B only, which is suggested for removal: C stays
    assert [[Path(r["path"]).name for r in index.rows(g.members)] for g in groups] == [["a.jpg", "b.jpg"]]

    # The rule itself: a removed photo is always a confirmed copy of the one kept
    assert star_groups(np.array([[0, 1], [1, 2]]), [0, 1, 2]) == [[0, 1]]
    assert star_groups(np.array([[0, 1], [1, 2]]), [1, 0, 2]) == [[1, 0, 2]]
    assert star_groups(np.array([[0, 1], [1, 2], [2, 3]]), [0, 1, 2, 3]) == [[0, 1], [2, 3]]


def test_the_table_says_why_and_nothing_is_deleted(scene, tmp_path: Path, capsys) -> None:
    original = save(scene[0], tmp_path / "original.jpg")
    copy = save(make_copy(scene[0], (0.02, 0.0, 0.0, 0.03), 0.75, 1.05, 60), tmp_path / "copy.jpg")
    other = save(scene[1], tmp_path / "look_alike.jpg")
    rng = np.random.default_rng(4)
    vector = normalize(rng.standard_normal((1, DIM)))[0]
    write_index(tmp_path / "index", [original, copy, other], np.stack([vector, moved(vector, 0.9, rng), vector]))

    help_text = index_script.build_parser()._subparsers._group_actions[0].choices["duplicates"].format_help()
    assert "Nothing is deleted" in " ".join(help_text.split())
    assert index_script.main(["duplicates", "-o", str(tmp_path / "index")]) == 0
    assert "nothing was deleted" in capsys.readouterr().out
    assert all(p.is_file() for p in (original, copy, other))

    (header, rows) = read_csv_table(tmp_path / "index" / "duplicates.csv")
    table = [dict(zip(header, row, strict=True)) for row in rows]
    assert [(r["path"], r["suggestion"]) for r in table] == [(str(original), "keep"), (str(copy), "remove")]
    removed = table[1]
    assert removed["copy_of"] == str(original) and removed["group"] == table[0]["group"] == "1"
    assert float(removed["similarity"]) == pytest.approx(0.9, abs=1e-3)
    assert float(removed["block_difference"]) <= pixels.MAX_BLOCK_DIFFERENCE
    assert float(removed["ssim"]) > 0.9
    assert "left +2.0%" in removed["crop"] and "bottom +3.0%" in removed["crop"], removed["crop"]
    assert "worst block differs by" in removed["reason"] and "embeddings 0.900" in removed["reason"]


def test_unreadable_photos_are_listed_not_fatal(scene, tmp_path: Path, capsys) -> None:
    original = save(scene[0], tmp_path / "original.jpg")
    copy = save(make_copy(scene[0], (0.01, 0.01, 0.0, 0.0), 0.9, 1.0, 80), tmp_path / "copy.jpg")
    (broken, gone) = (save(scene[1], tmp_path / "broken.jpg"), save(scene[2], tmp_path / "gone.jpg"))
    rng = np.random.default_rng(6)
    vector = normalize(rng.standard_normal((1, DIM)))[0]
    vectors = np.stack([moved(vector, 0.99, rng) for _ in range(4)])
    index = write_index(tmp_path / "index", [original, copy, broken, gone], vectors)
    broken.write_bytes(b"\xff\xd8 not a jpeg any more")
    gone.unlink()

    report = search_duplicates(index)
    assert sorted(Path(index.rows([p])[0]["path"]).name for p in report.unreadable) == ["broken.jpg", "gone.jpg"]
    assert all("cannot read image" in reason for reason in report.unreadable.values())
    assert [len(g.members) for g in report.groups] == [2]

    assert index_script.main(["duplicates", "-o", str(tmp_path / "index")]) == 0
    out = capsys.readouterr().out
    assert "2 photos could not be read" in out and str(broken) in out and str(gone) in out
    (header, rows) = read_csv_table(tmp_path / "index" / "duplicates.csv")
    listed = {row[0]: dict(zip(header, row, strict=True)) for row in rows}
    assert listed[str(gone)]["reason"].startswith("not compared: cannot read image")
    assert listed[str(broken)]["group"] == "" and listed[str(copy)]["suggestion"] == "remove"


def test_signature_neighbours_through_an_approximate_index() -> None:
    # Above the exact limit the signatures get an IVF-PQ index of their own; planted near-copies are still found
    rng = np.random.default_rng(7)
    signatures = normalize(rng.standard_normal((2500, pixels.SIGNATURE_CELLS**2)))
    copies = normalize(signatures[:20] + 0.05 * rng.standard_normal((20, pixels.SIGNATURE_CELLS**2)))
    vectors = np.concatenate([signatures, copies])
    blank = np.zeros((pixels.THUMB_SIDE, pixels.THUMB_SIDE), dtype=np.uint8)
    thumbnails = {photo: Thumbnail(blank, 1, 0.0, vector) for photo, vector in enumerate(vectors)}
    pairs = signature_pairs(thumbnails, 4, exact_limit=1000)
    assert {(i, 2500 + i) for i in range(20)} <= set(map(tuple, pairs.tolist()))
    # Every pair found is alike enough (by the exact signatures): a few random ones are, in 64 dimensions
    assert (np.einsum("pd,pd->p", vectors[pairs[:, 0]], vectors[pairs[:, 1]]) >= pixels.MIN_SIGNATURE_SIMILARITY).all()
