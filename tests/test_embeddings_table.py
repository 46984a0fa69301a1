"""The embeddings table (``birder-predict --save-embeddings``): ``e0`` .. ``e<D-1>`` in CSV, one ``embedding``
column (``FixedSizeList<float32>``) in Parquet; every reader takes both, and Parquet files of the older layout (one
float column per value)."""

from pathlib import Path

import numpy as np
import pytest
from test_predict import GOOD_PHOTOS, make_photo_folder, save_tiny_model

from birder.errors import BirderError
from birder.io.journal import final_path
from birder.io.table_files import embedding_table, read_embeddings, read_table_header_and_paths, read_table_rows
from birder.scripts.predict import main as predict
from birder.tools.cli import main as tools

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
DIM = 32  # the tiny model's width (test_predict.make_tiny_vit)


@pytest.fixture
def run(tmp_path: Path) -> tuple[list[str], Path]:
    """The options of a run with --save-embeddings (one photo per batch: bit-identical whatever the run), and the
    photos."""
    model = save_tiny_model(tmp_path / "tiny.pt")
    photos = make_photo_folder(tmp_path / "photos")
    return (["--weights", str(model), "-j", "0", "--no-progress", "-b", "1", "--save-embeddings"], photos)


def _csv_values(path: Path) -> tuple[list[str], np.ndarray]:
    lines = path.read_text().splitlines()
    rows = [line.split(",") for line in lines[1:]]
    return ([row[0] for row in rows], np.array([row[1:] for row in rows], dtype=np.float64).astype(np.float32))


def _old_layout(source: Path, destination: Path) -> Path:
    """``source`` (a list-column embeddings.parquet) rewritten as birder wrote it before: one float32 per column."""
    table = pq.read_table(source)
    matrix = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    columns = {"path": table.column("path")} | {f"e{i}": pa.array(matrix[:, i], pa.float32()) for i in range(DIM)}
    destination.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), destination)
    return destination


def test_parquet_embeddings_are_one_fixed_size_list_column_equal_to_the_csv(run, tmp_path: Path) -> None:
    (options, photos) = run
    assert predict([*options, str(photos), "--output-dir", "text"]) == 0
    assert predict([*options, str(photos), "--output-dir", "columnar", "--format", "parquet"]) == 0

    schema = pq.read_schema(tmp_path / "columnar" / "embeddings.parquet")
    assert schema.names == ["path", "embedding"]
    assert schema.field("path").type == pa.string()
    vector = schema.field("embedding").type
    assert pa.types.is_fixed_size_list(vector) and vector.list_size == DIM and vector.value_type == pa.float32()

    (paths, expected) = _csv_values(tmp_path / "text" / "embeddings.csv")
    assert len(paths) == len(GOOD_PHOTOS) and expected.shape == (len(GOOD_PHOTOS), DIM)
    table = pq.read_table(tmp_path / "columnar" / "embeddings.parquet")
    assert table.column("path").to_pylist() == paths
    stored = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert stored.dtype == np.float32 and np.array_equal(stored, expected)  # float32 for float32, bit for bit


def test_every_reader_reads_both_layouts(run, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (options, photos) = run
    assert predict([*options, str(photos), "--output-dir", "text"]) == 0
    assert predict([*options, str(photos), "--output-dir", "columnar", "--format", "parquet"]) == 0
    (paths, expected) = _csv_values(tmp_path / "text" / "embeddings.csv")
    new = tmp_path / "columnar" / "embeddings.parquet"
    old = _old_layout(new, tmp_path / "old" / "embeddings.parquet")

    # The library's reader: the same paths and vectors from each layout
    for path in (tmp_path / "text" / "embeddings.csv", new, old):
        embeddings = read_embeddings(path)
        assert embeddings.paths == paths and embeddings.vectors.dtype == np.float32, path
        assert np.array_equal(embeddings.vectors, expected), path
    (tmp_path / "other.csv").write_text("path,label\na.jpg,x\n")
    with pytest.raises(BirderError, match="not an embeddings table"):
        read_embeddings(tmp_path / "other.csv")

    # The tables' reader (resume, merge-results): the same header and rows as the CSV file, from either Parquet
    spec = embedding_table(DIM)
    csv_rows = (tmp_path / "text" / "embeddings.csv").read_text().splitlines()
    for path in (new, old):
        (header, found) = read_table_header_and_paths(path)
        assert header == spec.header and list(found) == paths
        assert [",".join(row) for row in read_table_rows(path, spec)] == csv_rows[1:]
    assert final_path(tmp_path / "columnar", spec, "parquet") == new


def test_a_resume_reads_either_layout_and_writes_the_list_column(run, tmp_path: Path) -> None:
    (options, photos) = run
    # The whole folder at once: what a resumed run must end with
    assert predict([*options, str(photos), "--output-dir", "whole", "--format", "parquet"]) == 0
    expected = pq.read_table(tmp_path / "whole" / "embeddings.parquet")

    first = [str(photos / name) for name in GOOD_PHOTOS[:2]]
    for layout in ("list", "old"):
        folder = tmp_path / f"resumed-{layout}"
        assert predict([*options, *first, "--output-dir", str(folder), "--format", "parquet"]) == 0
        if layout == "old":  # as a run of the older birder left it
            _old_layout(folder / "embeddings.parquet", folder / "embeddings.parquet")
        # The same command over the whole folder with --resume: the first photos are taken from the table
        assert predict([*options, str(photos), "--output-dir", str(folder), "--format", "parquet", "--resume"]) == 0
        table = pq.read_table(folder / "embeddings.parquet")
        assert table.schema.names == ["path", "embedding"]
        got = [Path(p).name for p in table.column("path").to_pylist()]
        assert got == [Path(p).name for p in expected.column("path").to_pylist()], layout
        assert table.column("embedding").equals(expected.column("embedding")), layout


@pytest.mark.parametrize("layouts", [("list", "list"), ("old", "list")])
def test_merged_parquet_shards_keep_the_list_column(run, tmp_path: Path, layouts: tuple[str, str]) -> None:
    (options, photos) = run
    base = [*options, str(photos), "--format", "parquet"]
    assert predict([*base, "--output-dir", "whole"]) == 0
    for k, layout in zip((1, 2), layouts, strict=True):
        assert predict([*base, "--shard", f"{k}/2", "--output-dir", f"shard{k}"]) == 0
        if layout == "old":  # a shard written by the older birder
            _old_layout(tmp_path / f"shard{k}" / "embeddings.parquet", tmp_path / f"shard{k}" / "embeddings.parquet")

    assert tools(["merge-results", "shard1", "shard2", "-o", "merged"]) == 0
    merged = pq.read_table(tmp_path / "merged" / "embeddings.parquet")
    whole = pq.read_table(tmp_path / "whole" / "embeddings.parquet")
    assert merged.schema.names == ["path", "embedding"]
    assert pa.types.is_fixed_size_list(merged.schema.field("embedding").type)
    assert merged.column("path").to_pylist() == whole.column("path").to_pylist()
    assert merged.column("embedding").equals(whole.column("embedding"))
