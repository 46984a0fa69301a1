"""birder-index: build, add, query, duplicates, cluster; the vector index; bad input (undecodable query, another
model, an interrupted build)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VIT_CONFIG
from PIL import Image, ImageFilter

import birder
from benchmarks.synthetic import make_class_folder
from birder.errors import BirderError
from birder.inference.classification import infer_image
from birder.model_registry import registry
from birder.scripts import index as index_script
from birder.search import build as build_module
from birder.search.build import IndexOptions, load_embedding_model, run_index
from birder.search.cluster import select_for_review
from birder.search.duplicates import connected_groups, find_duplicates, keep_order, near_pairs
from birder.search.query import query_photo, query_recorded
from birder.search.store import PhotoIndex
from birder.search.vectors import build_index, choose_plan, exact_search, normalize, recall_at

pytest.importorskip("faiss")
TINY = {**TINY_VIT_CONFIG, "patch_size": 8}
NEUTRAL = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def save_tiny_model(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    net = registry.net_factory("vit_b16", 4, config=TINY, size=(32, 32))
    info = birder.ModelInfo({f"class_{i}": i for i in range(4)}, None, NEUTRAL)
    birder.save_model(net, path, info)
    return path


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    """16 photos of 4 classes, plus a sharper/larger copy and a blurred copy of one photo (a burst)."""
    root = make_class_folder(tmp_path_factory.mktemp("photos"), [0, 9, 18, 27], per_class=4, size=48)
    original = Image.open(root / "disc_0" / "0.png")
    original.resize((96, 96), Image.Resampling.BICUBIC).save(root / "disc_0" / "0_large.png")
    original.filter(ImageFilter.GaussianBlur(0.6)).save(root / "disc_0" / "0_blurred.png")
    return root


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny.pt", seed=0)


def options(photos, output: Path, weights: Path, **extra) -> IndexOptions:
    return IndexOptions(photos, output, weights=weights, num_workers=0, progress=False, batch_size=4, **extra)


def test_build_query_add_duplicates_and_cluster(collection: Path, model_file: Path, tmp_path: Path, capsys) -> None:
    photos = sorted(collection.rglob("*.png"))
    (collection / "broken.jpg").write_bytes(b"not a jpeg")
    first = [p for p in photos if p.parent.name != "cross_3"] + [collection / "broken.jpg"]
    report = run_index(options(first, tmp_path / "index", model_file), add=False)
    assert (report.total, report.failures) == (len(first) - 1, 1) and report.plan_description.startswith("flat")

    index = PhotoIndex(tmp_path / "index")
    table = index.photos.to_pylist()
    assert [row["path"] for row in table] == sorted(str(p) for p in first if p.suffix == ".png")
    assert all(row["prediction"].startswith("class_") and 0 < row["probability"] <= 1 for row in table)
    # The stored embedding is the network's own
    loaded = load_embedding_model(None, model_file, None)
    (_, expected) = infer_image(loaded.net, table[0]["path"], loaded.transform, return_embedding=True)
    import pyarrow.parquet as pq

    stored = pq.read_table(tmp_path / "index" / "photos.parquet", columns=["embedding"]).column(0)[0].as_py()
    assert np.allclose(stored, expected[0], atol=1e-6)

    # A photo's nearest neighbour is itself; by recorded path it is left out and its burst copies come first
    assert query_photo(index, loaded, table[3]["path"], k=1)[0]["path"] == table[3]["path"]
    disc = collection / "disc_0" / "0.png"
    nearest = [r["path"] for r in query_recorded(index, disc, k=2)]
    assert str(disc) not in nearest and set(nearest) == {
        str(disc.with_name(n)) for n in ("0_large.png", "0_blurred.png")
    }

    # add: the new photos only; the old index is kept
    report = run_index(options([collection], tmp_path / "index", model_file), add=True)
    assert report.added == 4 and report.total == len(photos)

    index = PhotoIndex(tmp_path / "index")
    groups = find_duplicates(index, threshold=0.99)
    burst = next(g for g in groups if str(disc) in index.rows(g.members)[0]["path"] or len(g.members) == 3)
    kept = index.rows(burst.members)[0]["path"]
    assert kept.endswith("0_large.png")  # most pixels first

    assert index_script.main(["duplicates", "-o", str(tmp_path / "index"), "--threshold", "0.99"]) == 0
    assert "keep" in capsys.readouterr().out and (tmp_path / "index" / "duplicates.csv").is_file()
    argv = ["cluster", "-o", str(tmp_path / "index"), "--below-prob", "1.0", "--min-cluster-size", "2"]
    assert index_script.main(argv) == 0
    assert "photos to review" in capsys.readouterr().out
    assert (tmp_path / "index" / "clusters" / "clusters.csv").is_file()
    assert list((tmp_path / "index" / "clusters").glob("cluster_*.png"))
    # Contact sheets among the indexed photos would be indexed as photos by the next build: refused, nothing written
    sheets = photos[0].parent / "sheets"
    assert index_script.main([*argv, "--output-dir", str(sheets)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("birder-index: error: --output-dir") and "would be read as photos" in error
    assert not sheets.exists()


def test_bad_input_is_refused_in_one_line(collection: Path, model_file: Path, tmp_path: Path, capsys) -> None:
    photos = sorted(collection.rglob("*.png"))[:4]
    base = ["-o", str(tmp_path / "index"), "--weights", str(model_file)]
    # Built in bfloat16 (as --dtype auto picks on a CPU with native bf16): recorded; the embeddings stay float32
    argv = ["build", *map(str, photos), *base, "-j", "0", "-b", "2", "--no-progress", "--dtype", "bfloat16"]
    assert index_script.main(argv) == 0
    assert "Embedded in bfloat16 (asked for)" in capsys.readouterr().out
    index = PhotoIndex(tmp_path / "index")
    assert (index.info.dtype, index.info.dtype_reason) == ("bfloat16", "asked for")
    assert index.vectors.vectors.dtype == np.float32 and len(index) == 4
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    assert index_script.main(["query", str(tmp_path / "bad.jpg"), *base]) == 2
    assert capsys.readouterr().err.count("\n") == 1

    # Another model's embeddings are not comparable: refused by the recorded hash
    other = save_tiny_model(tmp_path / "other.pt", seed=1)
    assert index_script.main(["query", str(photos[0]), "-o", str(tmp_path / "index"), "--weights", str(other)]) == 2
    assert "built with another model" in capsys.readouterr().err
    assert index_script.main(["add", str(collection), "-o", str(tmp_path / "index"), "--weights", str(other)]) == 2
    assert "built with another model" in capsys.readouterr().err
    assert index_script.main(["build", str(collection), *base]) == 2
    assert "already holds an index" in capsys.readouterr().err
    assert index_script.main(["query", "--path-in-index", "elsewhere.png", "-o", str(tmp_path / "index")]) == 2

    # The same model in float32: the hash is the weights' as loaded, before the dtype conversion; accepted, and
    # its embedding of an indexed photo is that photo's nearest neighbour
    argv = ["query", str(photos[1]), *base, "--dtype", "float32", "-k", "1"]
    assert index_script.main(argv) == 0
    assert str(photos[1]) in capsys.readouterr().out

    # The same weights saved again (another file, another format): the same hash, accepted
    (net, info) = birder.load_model(model_file)
    birder.save_model(net, tmp_path / "copy.safetensors", info)
    copy = str(tmp_path / "copy.safetensors")
    assert index_script.main(["query", str(photos[0]), "-o", str(tmp_path / "index"), "--weights", copy]) == 0


def test_an_interrupted_build_resumes(collection: Path, model_file: Path, tmp_path: Path, monkeypatch) -> None:
    photos = sorted(collection.rglob("*.png"))
    calls = {"batches": 0}
    original = build_module.batch_rows

    def failing_rows(*args, **kwargs):
        calls["batches"] += 1
        if calls["batches"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(build_module, "batch_rows", failing_rows)
    with pytest.raises(KeyboardInterrupt):
        run_index(options(photos, tmp_path / "index", model_file, chunk_size=4), add=False)
    assert not (tmp_path / "index" / "index.json").exists()

    monkeypatch.setattr(build_module, "batch_rows", original)
    seen = []
    monkeypatch.setattr(build_module, "batch_rows", lambda batch, *a: seen.extend(batch.indices) or original(batch, *a))
    report = run_index(options(photos, tmp_path / "index", model_file, resume=True), add=False)
    assert report.total == len(photos) and len(seen) == len(photos) - 8  # two batches of 4 were durable
    assert [r["path"] for r in PhotoIndex(tmp_path / "index").photos.to_pylist()] == [str(p) for p in photos]


def test_approximate_index_reaches_its_recall_target() -> None:
    # Clusters with neighbour structure (as benchmarks/similarity.py, smaller): centre + noise of norm ~0.6
    rng = np.random.default_rng(0)
    centres = normalize(rng.standard_normal((100, 64)))
    vectors = normalize(centres[rng.integers(0, 100, size=6000)] + 0.08 * rng.standard_normal((6000, 64)))
    plan = choose_plan(len(vectors), 64, exact_limit=1000)
    assert plan.kind == "ivfpq"
    index = build_index(vectors, plan)
    queries = normalize(centres[rng.integers(0, 100, size=100)] + 0.08 * rng.standard_normal((100, 64)))
    (_, truth) = exact_search(vectors, queries, 10)
    (_, found) = index.search(queries, 10)
    assert recall_at(found, truth) >= 0.95
    assert index.plan.nprobe <= 64  # tuned: not the whole index

    # Near-duplicates through the approximate index: candidates by PQ score (within the measured margin), then exact
    copies = normalize(vectors[:20] + 0.002 * rng.standard_normal((20, 64)))
    with_copies = np.concatenate([vectors, copies]).astype(np.float32)
    pairs = near_pairs(build_index(with_copies, choose_plan(len(with_copies), 64, exact_limit=1000)), 0.98)
    assert pairs.tolist() == [[i, 6000 + i] for i in range(20)]


def test_duplicate_groups_keep_most_pixels_then_sharpest_then_earliest() -> None:
    assert connected_groups(np.array([[0, 1], [1, 2], [5, 7]])) == [[0, 1, 2], [5, 7]]
    facts = {
        1: (100, 5.0, "2024-05-01T08:00:00", "b"),
        2: (200, 1.0, None, "c"),
        3: (200, 3.0, "2024-05-02T08:00:00", "d"),
        4: (200, 3.0, "2024-05-01T08:00:00", "e"),
    }
    assert keep_order([1, 2, 3, 4], facts) == [4, 3, 2, 1]


def test_review_selection_takes_unknown_labels_and_low_probabilities() -> None:
    chosen = select_for_review(["unknown", "robin", "wren", ""], [0.9, 0.3, 0.8, float("nan")], below_prob=0.5)
    assert chosen.tolist() == [True, True, False, True]
    assert select_for_review(["unknown", "robin"], [0.9, 0.3], None).tolist() == [True, False]


def test_index_module_needs_no_model_for_stored_queries(
    collection: Path, model_file: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    photos = sorted(collection.rglob("*.png"))[:6]
    run_index(options(photos, tmp_path / "index", model_file), add=False)
    # From here on no model can be loaded: a query by recorded path and duplicates read only the index

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(build_module, "load_embedding_model", no_model)
    monkeypatch.setattr(build_module, "load_for_inference", no_model)
    index = tmp_path / "index"
    assert index_script.main(["query", "--path-in-index", str(photos[0]), "-o", str(index), "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(str(photos[0]) not in line for line in lines)
    assert index_script.main(["duplicates", "-o", str(index), "--threshold", "0.99"]) == 0

    # A photo file is embedded with the index's model: without -n or --weights that is refused in one line
    assert index_script.main(["query", str(photos[0]), "-o", str(index)]) == 2
    assert "pass -n NAME or --weights FILE" in capsys.readouterr().err
    with pytest.raises(BirderError, match="holds no index"):
        PhotoIndex(tmp_path / "nowhere")
