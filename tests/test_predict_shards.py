"""Prediction at scale: ``birder-predict --manifest`` and ``--shard K/N``, and ``merge-results`` of the shards.

The shards' merged tables must be the unsharded run's, row for row. Every run uses ``-b 1``: a photo is then
computed alone whatever the shard, so the numbers are bit-identical and the tables can be compared as files.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_predict import BAD_PHOTOS, GOOD_PHOTOS, make_photo_folder, random_photo, save_tiny_model
from test_predict_cli import _interrupt_after

from birder.errors import BirderError
from birder.io.journal import JOURNAL_DIR
from birder.runs.merge import MISSING_FILE
from birder.runs.photo_lists import PhotoBlock, parse_shard, read_manifest
from birder.scripts.predict import main as predict
from birder.tools.cli import main as tools

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("results", "failures", "embeddings", "probabilities")


@pytest.fixture
def job(tmp_path: Path) -> tuple[list[str], Path]:
    """The options of a run over a manifest (photos in an order of their own), and the manifest."""
    model = save_tiny_model(tmp_path / "tiny.pt")
    photos = make_photo_folder(tmp_path / "photos")
    names = sorted([*GOOD_PHOTOS, *BAD_PHOTOS])
    order = names[1::2] + names[::2]  # not the sorted order: results follow the manifest
    # Relative to the manifest's folder, one absolute (white space around it), one repeated, one absent
    lines = ["# photos of the survey", "", *(f"../photos/{name}" for name in order[1:])]
    lines += [f"  {photos / order[0]}  ", f"../photos/{order[2]}", "../photos/gone.jpg"]
    manifest = tmp_path / "lists" / "survey.txt"
    manifest.parent.mkdir()
    manifest.write_text("\n".join(lines) + "\n")
    options = ["--weights", str(model), "-j", "0", "--no-progress", "-b", "1", "--save-embeddings"]
    return (options, manifest)


def _photos_in_order(manifest: Path) -> list[str]:
    listed = read_manifest(manifest)
    return [listed.photo(entry) for entry in listed.entries]


def _assert_same_tables(got: Path, expected: Path, names: tuple[str, ...] = TABLES) -> None:
    compared = 0
    for name in names:
        for suffix in (".csv", ".parquet"):
            expected_file = expected / f"{name}{suffix}"
            if not expected_file.exists():
                continue
            if suffix == ".csv":
                assert (got / expected_file.name).read_text() == expected_file.read_text(), name
            else:
                import pyarrow.parquet as pq

                assert pq.read_table(got / expected_file.name).equals(pq.read_table(expected_file)), name
            compared += 1
    assert compared >= min(3, len(names))  # the tables asked for were there to compare


def _run_json(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


def _one_line_error(capsys: pytest.CaptureFixture, prog: str = "birder-predict") -> str:
    """The error on stderr: one line, the last (after what the run said before it found the mistake)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith(f"{prog}: error:"), lines
    assert not any("error" in line or "Traceback" in line for line in lines[:-1]), lines
    return lines[-1]


# ---------------------------------------------------------------------------------------------------------------------
# Shards and manifests
# ---------------------------------------------------------------------------------------------------------------------


def test_shards_are_contiguous_disjoint_and_cover_every_row() -> None:
    for total in range(0, 23):
        for count in range(1, 8):
            blocks = [PhotoBlock(index, count).bounds(total) for index in range(1, count + 1)]
            rows = [row for (start, stop) in blocks for row in range(start, stop)]
            assert rows == list(range(total)), (total, count)
            sizes = [stop - start for (start, stop) in blocks]
            assert max(sizes) - min(sizes) <= 1


def test_bad_shard_values_are_one_line_errors(job, capsys: pytest.CaptureFixture) -> None:
    assert parse_shard("2/3") == PhotoBlock(2, 3) and parse_shard(" 3 / 3 ") == PhotoBlock(3, 3) and parse_shard((1, 1))
    (options, manifest) = job
    for bad in ("0/3", "4/3", "3", "a/b", "2/0", "-1/2", "1/2/3"):
        with pytest.raises(BirderError, match=f"got '{bad}'"):
            parse_shard(bad)
        assert predict([*options, "--manifest", str(manifest), f"--shard={bad}"]) == 2
        err = _one_line_error(capsys)
        assert f"'{bad}'" in err and "1 <= K <= N" in err
    assert not Path("results").exists()  # refused before anything was written


def test_manifest_text_and_parquet(job, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (options, manifest) = job
    listed = read_manifest(manifest)
    assert listed.repeated == 1 and len(listed.entries) == len(GOOD_PHOTOS) + len(BAD_PHOTOS) + 1
    assert not any(entry.startswith(("#", " ")) or not entry for entry in listed.entries)
    photos = _photos_in_order(manifest)
    assert all(os.path.isabs(photo) for photo in photos)

    assert predict([*options, "--manifest", str(manifest), "--output-dir", "text"]) == 0
    assert "1 repeated path(s)" in capsys.readouterr().err
    rows = (Path("text/results.csv").read_text().splitlines()[1:], Path("text/failures.csv").read_text())
    classified = [row.split(",")[0] for row in rows[0]]
    assert classified == [photo for photo in photos if photo in classified]  # in the manifest's order
    assert len(classified) == len(GOOD_PHOTOS) and photos[-1].endswith("gone.jpg") and "gone.jpg" in rows[1]
    assert _run_json(Path("text"))["settings"]["manifest"]["path"] == str(manifest)

    # The same photos as the Parquet manifest's "path" column (absolute paths, a null row skipped)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = tmp_path / "survey.parquet"
    pq.write_table(pa.table({"id": list(range(len(photos) + 1)), "path": [*photos, None]}), table)
    assert read_manifest(table).entries == photos
    assert predict([*options, "--manifest", str(table), "--output-dir", "parquet"]) == 0
    _assert_same_tables(Path("parquet"), Path("text"), ("results", "failures", "embeddings"))

    pq.write_table(pa.table({"file": photos}), tmp_path / "no-path.parquet")
    (tmp_path / "blank.txt").write_text("# nothing\n\n")
    (tmp_path / "fake.parquet").write_text("not parquet\n")
    cases = {
        "no 'path' column (it has: file)": ["--manifest", str(tmp_path / "no-path.parquet")],
        "lists no photos": ["--manifest", str(tmp_path / "blank.txt")],
        "as Parquet": ["--manifest", str(tmp_path / "fake.parquet")],
        "does not exist": ["--manifest", str(tmp_path / "missing.txt")],
        "one of the two (both given)": ["--manifest", str(manifest), str(tmp_path / "photos")],
        "one of the two (neither given)": [],
    }
    capsys.readouterr()
    for message, args in cases.items():
        assert predict([*options, *args, "--output-dir", "refused"]) == 2, message
        assert message in _one_line_error(capsys)


# ---------------------------------------------------------------------------------------------------------------------
# Sharded runs, merged
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("table_format", ["csv", "parquet"])
def test_merged_shards_equal_one_unsharded_run(job, table_format: str, capsys: pytest.CaptureFixture) -> None:
    (options, manifest) = job
    base = [*options, "--manifest", str(manifest), "--format", table_format, "--save-probabilities"]
    for k in (3, 1, 2):
        assert predict([*base, "--shard", f"{k}/3", "--output-dir", f"shard{k}"]) == 0
        assert f"PhotoBlock {k}/3: photos" in capsys.readouterr().err
        assert _run_json(Path(f"shard{k}"))["settings"]["shard"] == f"{k}/3"
    assert predict([*base, "--output-dir", "whole"]) == 0
    capsys.readouterr()

    assert tools(["merge-results", "shard2", "shard3", "shard1", "-o", "merged"]) == 0  # any order of folders
    out = capsys.readouterr().out
    assert "Merged 3 of 3 shards" in out and "every photo of the list is in the merged tables" in out
    _assert_same_tables(Path("merged"), Path("whole"))
    assert not Path("merged", MISSING_FILE).exists()
    assert _run_json(Path("merged"))["settings"] == _run_json(Path("whole"))["settings"]
    assert _run_json(Path("merged"))["missing"] == 0
    assert [entry["shard"] for entry in _run_json(Path("merged"))["merged_from"]] == ["1/3", "2/3", "3/3"]


def test_shards_of_found_inputs_merge_through_the_console(
    job, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    (options, _) = job
    # Relative: the rows say "photos/...", as in an unsharded run. Feature files stay in each shard's folder
    base = [*options, "photos", "--save-features"]
    assert predict([*base, "--shard", "1/2", "--output-dir", "a"]) == 0
    assert predict([*base, "--shard", "2/2", "--output-dir", "b"]) == 0
    assert predict([*base, "--output-dir", "whole"]) == 0
    assert "PhotoBlock 2/2: photos 5-9 of the 9 found" in capsys.readouterr().err

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "birder.tools", "merge-results", "b", "a", "-o", "merged"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "Merged 2 of 2 shards (9 photos found)" in result.stdout
    assert "every photo of the list is in the merged tables" in result.stdout
    assert "warning: not merged (made from each shard's photos alone): features/" in result.stderr
    _assert_same_tables(tmp_path / "merged", tmp_path / "whole", (*TABLES, "features"))
    assert _run_json(tmp_path / "merged")["settings"] == _run_json(tmp_path / "whole")["settings"]

    # New photos since: the list cannot be found again, so the missing photos (shard 2's) are counted, not named
    random_photo(99).save(tmp_path / "photos" / "new.jpg")
    capsys.readouterr()
    assert tools(["merge-results", "a", "-o", "merged", "--overwrite"]) == 0  # the same folder again: --overwrite
    err = capsys.readouterr().err
    warned = caplog.text  # in this process the library's warnings go to pytest's log capture
    assert "cannot name the missing photos: the photos under" in warned and "changed since the shards ran" in warned
    assert "5 photo(s) of the list are in no shard's tables\n" in err
    assert not Path("merged", MISSING_FILE).exists() and _run_json(Path("merged"))["missing"] == 5


def test_absent_shard_is_listed_as_missing_and_a_resume_fills_it(
    job, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    (options, manifest) = job
    base = [*options, "--manifest", str(manifest)]
    for k in (1, 3):
        assert predict([*base, "--shard", f"{k}/3", "--output-dir", f"shard{k}"]) == 0
    capsys.readouterr()

    assert tools(["merge-results", "shard1", "shard3", "-o", "merged"]) == 0
    captured = capsys.readouterr()
    assert "shard(s) 2 of 3 not given" in caplog.text  # the library's warning (pytest captures the log)
    photos = _photos_in_order(manifest)
    (start, stop) = PhotoBlock(2, 3).bounds(len(photos))
    assert f"{stop - start} photo(s) of the list are in no shard's tables" in captured.err
    assert Path("merged", MISSING_FILE).read_text().splitlines() == photos[start:stop]
    assert _run_json(Path("merged"))["missing"] == stop - start
    assert _run_json(Path("merged"))["shards_absent"] == [2]
    assert len(Path("merged/results.csv").read_text().splitlines()) < len(GOOD_PHOTOS) + 1

    # The merged folder is an unsharded run's: resuming it classifies the missing photos only
    assert predict([*base, "--resume", "--output-dir", "merged"]) == 0
    assert f"Resuming: {len(photos) - (stop - start)} of {len(photos)} photos already done" in capsys.readouterr().err
    assert predict([*base, "--output-dir", "whole"]) == 0
    _assert_same_tables(Path("merged"), Path("whole"))


def test_interrupted_shard_resumes_and_refuses_another_shard_or_manifest(
    job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (options, manifest) = job
    base = [*options, "--manifest", str(manifest), "--chunk-size", "1"]
    with monkeypatch.context() as patch:
        _interrupt_after(patch, batches=1)  # shard 2/2 has 2 readable photos: one done, one not
        assert predict([*base, "--shard", "2/2", "--output-dir", "shard2"]) == 130
    assert Path("shard2", JOURNAL_DIR).is_dir() and not Path("shard2/results.csv").exists()
    capsys.readouterr()

    # Unfinished: not merged
    assert predict([*base, "--shard", "1/2", "--output-dir", "shard1"]) == 0
    capsys.readouterr()
    assert tools(["merge-results", "shard1", "shard2", "-o", "merged"]) == 2
    assert "holds an unfinished run" in _one_line_error(capsys, "python -m birder.tools merge-results")

    # Another shard, or another manifest, in the same folder: refused, the folder left as it was
    assert predict([*base, "--shard", "1/2", "--output-dir", "shard2", "--resume"]) == 2
    assert "other settings (shard 2/2 then, 1/2 now)" in _one_line_error(capsys)
    other = tmp_path / "lists" / "other.txt"
    other.write_text(manifest.read_text() + "../photos/more.jpg\n")
    assert predict([*options, "--manifest", str(other), "--shard", "2/2", "--output-dir", "shard2", "--resume"]) == 2
    assert "other settings (manifest)" in _one_line_error(capsys)

    assert predict([*base, "--shard", "2/2", "--output-dir", "shard2", "--resume"]) == 0
    assert "Resuming: " in capsys.readouterr().err
    assert not Path("shard2", JOURNAL_DIR).exists()
    assert tools(["merge-results", "shard1", "shard2", "-o", "merged"]) == 0
    assert predict([*base, "--output-dir", "whole"]) == 0
    _assert_same_tables(Path("merged"), Path("whole"), ("results", "failures", "embeddings"))


def test_merge_refuses_mixed_settings_overlaps_and_other_lists(
    job, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (options, manifest) = job
    base = [*options, "--manifest", str(manifest)]
    runs = {
        "s1": [*base, "--shard", "1/2"],
        "s2": [*base, "--shard", "2/2"],
        "s2-top3": [*base, "--shard", "2/2", "--top-k", "3"],
        "s2-model": [*base, "--shard", "2/2", "--weights", str(save_tiny_model(tmp_path / "other.pt", seed=1))],
        "s1-of-3": [*base, "--shard", "1/3"],
        "plain": [*options, "photos"],
    }
    other = tmp_path / "lists" / "other.txt"
    other.write_text(manifest.read_text().replace("../photos/gone.jpg", "../photos/elsewhere.jpg"))
    runs["s2-other-list"] = [*options, "--manifest", str(other), "--shard", "2/2"]
    for folder, args in runs.items():
        assert predict([*args, "--output-dir", folder]) == 0, folder
    capsys.readouterr()

    cases = {
        "'s1' and 's2-top3' were run with a different top_k (5 and 3)": ["s1", "s2-top3"],
        "'s1' and 's2-model' were run with a different weights": ["s1", "s2-model"],
        "'s1' and 's2-other-list' were run with a different manifest": ["s1", "s2-other-list"],
        "'s1' and 's1' are both shard 1/2": ["s1", "s2", "s1"],
        "'s1' is shard 1/2 but 's1-of-3' is shard 1/3": ["s1", "s1-of-3"],
        "'plain' is a run without --shard or --manifest": ["s1", "plain"],
        "is one of the shards": ["s1", "s2", "-o", "s2"],
        "is not the manifest the shards ran on": ["s1", "s2", "--manifest", str(other)],
    }
    for message, args in cases.items():
        assert tools(["merge-results", *args, *(["-o", "merged"] if "-o" not in args else [])]) == 2, message
        err = _one_line_error(capsys, "python -m birder.tools merge-results")
        assert message in err, err
    assert not Path("merged/results.csv").exists()

    # A shard folder whose tables are not its part of the list (copied from another shard): refused
    Path("s2/results.csv").write_bytes(Path("s1/results.csv").read_bytes())
    assert tools(["merge-results", "s1", "s2", "-o", "merged"]) == 2
    assert "which is not in the part of the photo list that shard 2/2 covers" in _one_line_error(
        capsys, "python -m birder.tools merge-results"
    )

    # The manifest moved (another machine): found with --manifest, checked by its hash
    moved = tmp_path / "lists" / "moved.txt"
    manifest.rename(moved)
    assert predict([*base[:-2], "--manifest", str(moved), "--shard", "2/2", "--output-dir", "s2-moved"]) == 0
    capsys.readouterr()
    assert tools(["merge-results", "s1", "s2-moved", "-o", "moved-merge"]) == 0
    assert "every photo of the list" in capsys.readouterr().out


def test_detection_shards_merge_like_one_run(job, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from detect_support import save_tiny_detector

    (options, manifest) = job
    detector = save_tiny_detector(tmp_path / "det.pt")
    base = [*options[:-1], "--detector", str(detector), "--manifest", str(manifest), "--format", "parquet"]
    for k in (1, 2):
        assert predict([*base, "--shard", f"{k}/2", "--output-dir", f"shard{k}"]) == 0
    assert predict([*base, "--output-dir", "whole"]) == 0
    capsys.readouterr()
    assert tools(["merge-results", "shard1", "shard2", "-o", "merged"]) == 0
    assert "every photo of the list" in capsys.readouterr().out
    # Several rows per photo (one per box) in results, one per photo in the photos table
    _assert_same_tables(Path("merged"), Path("whole"), ("results", "failures", "photos"))


@pytest.mark.slow
def test_shard_under_torchrun_matches_single_process(job, tmp_path: Path) -> None:
    import numpy as np
    import pyarrow.parquet as pq
    from test_predict_cli import _run_in_own_session, _torchrun

    (options, manifest) = job
    args = [*options, "--manifest", str(manifest), "--shard", "2/3", "--format", "parquet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [*_torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "birder.scripts.predict"]
    result = _run_in_own_session([*command, *args, "--output-dir", str(tmp_path / "dist")], tmp_path, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert predict([*args, "--output-dir", str(tmp_path / "single")]) == 0
    _assert_same_tables(tmp_path / "dist", tmp_path / "single", ("results", "failures"))
    # Embeddings to float32 rounding: the torchrun ranks run with 1 thread, this process with its own count, and a
    # reduction split over other threads rounds differently.
    (dist, single) = (pq.read_table(tmp_path / name / "embeddings.parquet") for name in ("dist", "single"))
    assert dist.column("path").to_pylist() == single.column("path").to_pylist()
    values = [np.array(list(table.drop(["path"]).to_pydict().values()), dtype=np.float64) for table in (dist, single)]
    np.testing.assert_allclose(values[0], values[1], rtol=1e-5, atol=1e-6)
