"""birder-index on photos none of which can be read, and queries of an index without photos: one line, exit 2."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VIT_CONFIG

import birder
from benchmarks.synthetic import make_class_folder
from birder.model_registry import registry
from birder.scripts import index as index_script
from birder.search.build import load_embedding_model
from birder.search.store import IndexInfo, write_info, write_photos
from birder.search.vectors import build_index, choose_plan

pytest.importorskip("faiss")
TINY = {**TINY_VIT_CONFIG, "patch_size": 8}
NEUTRAL = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = registry.net_factory("vit_b16", 4, config=TINY, size=(32, 32))
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    birder.save_model(net, path, birder.ModelInfo({f"class_{i}": i for i in range(4)}, None, NEUTRAL))
    return path


def _error_line(capsys: pytest.CaptureFixture) -> str:
    """The one error line on stderr, its last (log lines before it, when a test before set logging up, are fine)."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("birder-index: error: "), lines
    return errors[0]


def test_build_of_only_unreadable_photos_is_refused(model_file: Path, tmp_path: Path, capsys) -> None:
    photos = tmp_path / "broken"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"\xff\xd8 truncated")
    (photos / "b.png").write_bytes(b"not a png")
    (photos / "c.jpg").write_bytes(b"")
    index = tmp_path / "index"
    argv = ["build", str(photos), "-o", str(index), "--weights", str(model_file), "-j", "0", "--no-progress"]
    assert index_script.main(argv) == 2
    line = _error_line(capsys)
    assert "none of the 3 photos could be read" in line and str(index / "failures.csv") in line
    # No index that would answer every query with nothing; the reasons are listed, one photo per row
    assert not (index / "index.json").exists() and not (index / "photos.parquet").exists()
    rows = (index / "failures.csv").read_text().splitlines()
    assert rows[0] == "path,error" and sorted(Path(row.split(",")[0]).name for row in rows[1:]) == [
        "a.jpg",
        "b.png",
        "c.jpg",
    ]

    # Once a readable photo is there, the same command builds (the failed attempt left nothing in the way), and
    # failures.csv lists this run's unreadable photos once
    make_class_folder(photos, [0], per_class=1, size=32)
    assert index_script.main(argv) == 0
    assert "1 photos (1 added, 3 could not be read)" in capsys.readouterr().out
    assert len((index / "failures.csv").read_text().splitlines()) == 1 + 3


def test_query_of_an_index_without_photos_is_refused(model_file: Path, tmp_path: Path, capsys) -> None:
    # An index of 0 photos, as the build wrote before it refused them (or any index.json that says count 0)
    index = tmp_path / "empty"
    index.mkdir()
    dim = TINY["hidden_dim"]
    assert write_photos(index, dim, 0, []) == 0
    vector_index = build_index(np.zeros((0, dim), np.float32), choose_plan(0, dim))
    vector_index.save(index)
    fingerprint = load_embedding_model(None, model_file, None).fingerprint
    write_info(index, IndexInfo(fingerprint, {"weights": str(model_file)}, {}, dim, 0, vector_index.plan))

    photo = make_class_folder(tmp_path / "photos", [0], per_class=1, size=32) / "disc_0" / "0.png"
    for argv in (
        ["query", str(photo), "-o", str(index), "--weights", str(model_file)],
        ["query", "--path-in-index", str(photo), "-o", str(index)],
    ):
        assert index_script.main(argv) == 2
        line = _error_line(capsys)
        assert f"index '{index}' holds no photos" in line and "birder-index add" in line
