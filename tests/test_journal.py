"""The generic journal: tables that survive a kill, resumable runs, atomic merged files in CSV and Parquet."""

import gc
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from birder.errors import BirderError
from birder.io import journal as J
from birder.io import table_files as T

# Tables of the shape a prediction run writes: two mark their paths done, one is always CSV
SPEC = T.TableSpec(
    "results", (T.Column("path"), T.Column("prediction"), T.Column("prob", "float32", ".6f")), marks_done=True
)
FAILURES = T.TableSpec("failures", T.string_columns("path", "error"), fixed_format="csv", marks_done=True)
SETTINGS = {"model": "tiny", "top_k": 1}
PATHS = [f"photos/{i:02d}.jpg" for i in range(10)]
ORDER = {path: index for index, path in enumerate(PATHS)}


def _row(index: int, prob: float = 0.5) -> list[str]:
    return SPEC.format_row([PATHS[index], f"class{index % 3}", prob])


def _journal(output_dir: Path, indices: list[int], rank: int = 0, attempt: int = 0, spec=SPEC) -> Path:
    writer = J.JournalWriter(output_dir / J.JOURNAL_DIR / f"{spec.name}.r{rank}.a{attempt}.csv", spec)
    writer.add(_row(i) if spec is SPEC else [PATHS[i], "bad"] for i in indices)
    writer.close()
    return writer.path


def test_columns_format_and_parse() -> None:
    prob = T.Column("p", "float32", ".6f")
    assert prob.format(0.1234567) == "0.123457" and prob.format(None) == ""
    assert prob.parse("") is None and prob.parse("0.5") == 0.5
    embedding = T.Column("e0", "float32")
    value = np.float32(0.123456789)
    assert np.float32(float(embedding.format(value))) == value  # 9 significant digits round-trip float32
    with pytest.raises(ValueError, match="first column"):
        T.TableSpec("x", (T.Column("name"),))


def test_journal_commits_in_chunks_and_torn_lines_are_dropped(tmp_path: Path) -> None:
    journals = J.JournalSet(tmp_path, [FAILURES, SPEC], rank=0, attempt=0, chunk_size=3)
    journals.add({"results": [_row(0), _row(1)]}, num_inputs=2)
    path = journals.writers["results"].path
    assert T.read_csv_table(path)[0] == SPEC.header
    assert list(T.read_csv_table(path)[1]) == []  # buffered: under one chunk
    journals.add({"results": [_row(2)], "failures": [[PATHS[3], "bad"]]}, num_inputs=2)
    assert [r[0] for r in T.read_csv_table(path)[1]] == PATHS[:3]  # chunk reached: committed

    with open(path, "a") as handle:  # a kill in the middle of a write
        handle.write('photos/04.jpg,"class')
    assert [r[0] for r in T.read_csv_table(path)[1]] == PATHS[:3]
    journals.writers["results"]._file.close()
    journals.writers["failures"].close()


def test_tables_that_mark_inputs_done_commit_last_and_alone_say_what_is_done(tmp_path: Path) -> None:
    notes = T.TableSpec("notes", T.string_columns("path", "note"))
    journals = J.JournalSet(tmp_path, [SPEC, notes], rank=0, attempt=0, chunk_size=1)
    assert list(journals.writers) == ["notes", "results"]
    journals.add({"notes": [[PATHS[0], "x"], [PATHS[1], "y"]], "results": [_row(0)]}, num_inputs=2)
    journals.close()
    assert J.prepare_run(tmp_path, [SPEC, notes], "csv", SETTINGS, resume=True).done == {PATHS[0]}


def test_fresh_run_discards_old_journals_resume_keeps_them(tmp_path: Path) -> None:
    _journal(tmp_path, [0, 1, 2])
    assert J.prepare_run(tmp_path, [FAILURES, SPEC], "csv", SETTINGS, resume=False) == J.ResumeState(frozenset(), 0)
    assert J.list_journals(tmp_path) == []

    _journal(tmp_path, [0, 2])
    _journal(tmp_path, [1], rank=1)
    _journal(tmp_path, [5], spec=FAILURES)
    state = J.prepare_run(tmp_path, [FAILURES, SPEC], "csv", SETTINGS, resume=True)
    assert state.done == {PATHS[0], PATHS[1], PATHS[2], PATHS[5]}
    assert state.attempt == 1


def test_resume_refuses_other_settings_or_columns(tmp_path: Path) -> None:
    J.prepare_run(tmp_path, [FAILURES, SPEC], "csv", SETTINGS, resume=False)
    _journal(tmp_path, [0])
    with pytest.raises(BirderError, match=r"other settings \(top_k\)"):
        J.prepare_run(tmp_path, [FAILURES, SPEC], "csv", {**SETTINGS, "top_k": 3}, resume=True)

    wider = T.TableSpec("results", (*SPEC.columns, T.Column("extra")))
    with pytest.raises(BirderError, match="other columns"):
        J.prepare_run(tmp_path, [FAILURES, wider], "csv", SETTINGS, resume=True)
    with pytest.raises(BirderError, match=r"would write \(different model\?\); run again without --resume"):
        J.prepare_run(tmp_path, [FAILURES, wider], "csv", SETTINGS, resume=True, columns_hint="different model?")


def test_merge_orders_deduplicates_and_drops_unknown_paths(tmp_path: Path) -> None:
    J.prepare_run(tmp_path, [FAILURES, SPEC], "csv", SETTINGS, resume=False)
    _journal(tmp_path, [1, 4, 7], rank=0)
    _journal(tmp_path, [0, 3, 6, 9], rank=1)
    _journal(tmp_path, [2, 4, 5], rank=0, attempt=1)  # 4 again: a chunk redone after a crash
    stale = J.JournalWriter(tmp_path / J.JOURNAL_DIR / "results.r2.a0.csv", SPEC)
    stale.add([["photos/gone.jpg", "x", "0.1"]])
    stale.close()

    seen = []
    written = J.finalize_run(
        tmp_path,
        [FAILURES, SPEC],
        "csv",
        ORDER,
        include_final=False,
        on_row={"results": seen.append},
        run_info=lambda: {"summary": {"classified": len(seen)}},
    )
    (header, rows) = T.read_csv_table(written["results"])
    paths = [row[0] for row in rows]
    assert header == SPEC.header and paths == [*PATHS[:8], PATHS[9]]
    assert [row[0] for row in seen] == paths
    assert J.list_journals(tmp_path) == [] and not (tmp_path / J.JOURNAL_DIR).exists()
    info = json.loads((tmp_path / J.RUN_INFO_FILE).read_text())
    assert info["settings"] == SETTINGS and info["summary"] == {"classified": 9}
    assert oct(written["results"].stat().st_mode & 0o777) != oct(0o600)  # an ordinary file, not mkstemp's


@pytest.mark.parametrize("file_format", ["csv", "parquet"])
def test_resume_extends_a_finished_run(tmp_path: Path, file_format: str) -> None:
    J.prepare_run(tmp_path, [FAILURES, SPEC], file_format, SETTINGS, resume=False)
    _journal(tmp_path, [0, 2, 4])
    J.finalize_run(tmp_path, [FAILURES, SPEC], file_format, ORDER, include_final=False)
    assert J.final_path(tmp_path, SPEC, file_format).suffix == f".{file_format}"
    assert J.final_path(tmp_path, FAILURES, file_format).suffix == ".csv"  # failures are for people: CSV

    state = J.prepare_run(tmp_path, [FAILURES, SPEC], file_format, SETTINGS, resume=True)
    assert state.done == {PATHS[0], PATHS[2], PATHS[4]} and state.include_final
    _journal(tmp_path, [1, 3], attempt=state.attempt)
    written = J.finalize_run(tmp_path, [FAILURES, SPEC], file_format, ORDER, include_final=True)
    rows = list(T.read_table_rows(written["results"], SPEC))
    assert rows == [_row(i) for i in range(5)]  # the same text whatever the storage format


def test_final_tables_of_other_settings_never_count(tmp_path: Path) -> None:
    # A finished run with model X, then a fresh run with model Y interrupted, then resumed
    J.prepare_run(tmp_path, [FAILURES, SPEC], "csv", {"model": "X"}, resume=False)
    _journal(tmp_path, [0, 1])
    J.finalize_run(tmp_path, [FAILURES, SPEC], "csv", ORDER, include_final=False)
    J.prepare_run(tmp_path, [FAILURES, SPEC], "csv", SETTINGS, resume=False)
    _journal(tmp_path, [2])
    state = J.prepare_run(tmp_path, [FAILURES, SPEC], "csv", SETTINGS, resume=True)
    assert state.done == {PATHS[2]} and not state.include_final


def test_previous_final_table_in_another_order_is_sorted(tmp_path: Path) -> None:
    T.write_table(tmp_path / "results.csv", SPEC, [_row(5), _row(1)])
    (tmp_path / J.RUN_INFO_FILE).write_text(json.dumps({"settings": SETTINGS}))
    assert J.prepare_run(tmp_path, [FAILURES, SPEC], "csv", SETTINGS, resume=True).include_final
    _journal(tmp_path, [0, 3])
    J.finalize_run(tmp_path, [FAILURES, SPEC], "csv", ORDER, include_final=True)
    assert [r[0] for r in T.read_csv_table(tmp_path / "results.csv")[1]] == [PATHS[i] for i in (0, 1, 3, 5)]


def test_parquet_types_and_missing_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.parquet as pq

    spec = T.TableSpec("t", (T.Column("path"), T.Column("p", "float32"), T.Column("lat", "float64", ".7f")))
    T.write_table(tmp_path / "t.parquet", spec, [["a", "0.25", ""], ["b", "1", "-52.5200000"]])
    table = pq.read_table(tmp_path / "t.parquet")
    assert [str(t) for t in table.schema.types] == ["string", "float", "double"]
    assert table.to_pydict() == {"path": ["a", "b"], "p": [0.25, 1.0], "lat": [None, -52.52]}
    assert T.write_table(tmp_path / "empty.parquet", spec, []) == 0
    assert pq.read_table(tmp_path / "empty.parquet").num_rows == 0

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(BirderError, match=r"birder\[parquet\]"):
        T.write_table(tmp_path / "u.parquet", spec, [])
    assert not (tmp_path / "u.parquet").exists()


def resource_warnings(action) -> list[str]:
    """The ResourceWarnings (files never closed) raised while running ``action`` and collecting its garbage.

    Recorded rather than turned into errors: a file object warns from its finalizer, where an exception would be
    swallowed (printed as "Exception ignored in ...") instead of failing the test.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        action()
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def _embedding_journal(output_dir: Path, spec: T.TableSpec, indices: list[int], attempt: int) -> None:
    writer = J.JournalWriter(output_dir / J.JOURNAL_DIR / f"{spec.name}.r0.a{attempt}.csv", spec)
    writer.add([spec.format_row([PATHS[i], 0.5, 0.25]) for i in indices])
    writer.close()


@pytest.mark.parametrize("file_format", ["csv", "parquet"])
def test_resume_closes_every_table_it_opens(tmp_path: Path, file_format: str) -> None:
    # Embeddings: a table whose rows the resume does not need (only results and failures say what is done)
    embeddings = T.TableSpec("embeddings", (T.Column("path"), *T.float_columns(["e0", "e1"])))
    specs = [embeddings, FAILURES, SPEC]
    J.prepare_run(tmp_path, specs, file_format, SETTINGS, resume=False)
    _journal(tmp_path, [0, 1])
    _journal(tmp_path, [2], spec=FAILURES)
    _embedding_journal(tmp_path, embeddings, [0, 1], attempt=0)
    J.finalize_run(tmp_path, specs, file_format, ORDER, include_final=False)
    _embedding_journal(tmp_path, embeddings, [3], attempt=1)  # an interrupted second run extending the first
    _journal(tmp_path, [3], attempt=1)

    states = []
    assert resource_warnings(lambda: states.append(J.prepare_run(tmp_path, specs, file_format, SETTINGS, True))) == []
    assert states[0].done == {PATHS[0], PATHS[1], PATHS[2], PATHS[3]} and states[0].include_final
    assert resource_warnings(lambda: J.finalize_run(tmp_path, specs, file_format, ORDER, include_final=True)) == []
    merged = T.read_table_rows(J.final_path(tmp_path, SPEC, file_format), SPEC)
    assert [row[0] for row in merged] == [PATHS[0], PATHS[1], PATHS[3]]
