"""The tables of ``birder-predict``: their columns, a batch's rows, the per-photo feature files."""

from pathlib import Path

import numpy as np

from birder.inference import tables as PT
from birder.io import journal as J


def test_prediction_tables_rows() -> None:
    tables = PT.PredictionTables(["owl", "tit", "jay"], top_k=2, probabilities=True, logits=True, embedding_dim=2)
    assert tables.names == ["probabilities", "logits", "embeddings", "failures", "results"]
    assert tables.results.header[:6] == ["path", "prediction", "top1_class", "top1_prob", "top2_class", "top2_prob"]
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]], dtype=np.float32)
    rows = tables.rows(
        ["a.jpg", "b.jpg"],
        probs,
        [[0, 1], [0, 1]],
        [[0.7, 0.2], [0.4, 0.35]],
        [("2023-05-14T07:32:10", -52.5, 13.25), (None, None, None)],
        min_prob=0.5,
        logits=np.zeros((2, 3)),
        embeddings=np.ones((2, 2)),
    )
    top = ["owl", "0.700000", "tit", "0.200000"]
    assert rows["results"][0] == ["a.jpg", "owl", *top, "2023-05-14T07:32:10", "-52.5000000", "13.2500000"]
    assert rows["results"][1][:3] == ["b.jpg", PT.UNCERTAIN, "owl"]  # below --min-prob, top-k kept
    assert rows["results"][1][-3:] == ["", "", ""]
    assert rows["embeddings"][1] == ["b.jpg", "1", "1"]
    assert tables.parse_result(rows["results"][1]) == ("b.jpg", PT.UNCERTAIN, [("owl", 0.4), ("tit", 0.35)])
    assert PT.PredictionTables(["owl"], top_k=5).top_k == 1


def test_feature_files(tmp_path: Path) -> None:
    from safetensors import safe_open

    name = PT.feature_file_name("photos/a b/IMG 1.jpg")
    assert name.startswith("IMG_1-") and name.endswith(".safetensors")
    assert name == PT.feature_file_name("photos/a b/IMG 1.jpg") != PT.feature_file_name("other/IMG 1.jpg")
    PT.write_feature_file(tmp_path / name, {"neck": np.ones((4, 2, 3), np.float32)}, "photos/a b/IMG 1.jpg")
    with safe_open(str(tmp_path / name), "pt") as handle:
        assert handle.get_tensor("neck").shape == (4, 2, 3)
        assert handle.metadata() == {"path": "photos/a b/IMG 1.jpg"}


def test_photo_tables_mark_photos_done_and_failures_are_csv(tmp_path: Path) -> None:
    tables = PT.PredictionTables(["owl", "tit"], top_k=1, embedding_dim=2, features=True)
    assert [spec.name for spec in tables.specs if spec.marks_done] == ["failures", "results"]
    assert tables.specs[-2:] == (tables.failures, tables.results)  # committed last
    assert J.final_path(tmp_path, tables.failures, "parquet").name == "failures.csv"  # read by people
    assert J.final_path(tmp_path, tables.results, "parquet").name == "results.parquet"


def test_feature_files_of_a_batch(tmp_path: Path) -> None:
    paths = ["photos/a.jpg", "other/a.jpg"]
    names = PT.write_feature_files(tmp_path, paths, {"neck": np.ones((2, 4, 2, 3), np.float32)})
    assert names == [PT.feature_file_name(path) for path in paths] and len(set(names)) == 2
    assert all((tmp_path / name).is_file() for name in names)
