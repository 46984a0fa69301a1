"""``birder-predict`` end to end: the console script in a subprocess, resume after a kill, torchrun.

Each subprocess pays about 5 s of imports, so the subprocess runs are few and each covers several modes; the
other modes run ``main()`` in this process, which exercises the same code.
"""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_vit
from test_journal import resource_warnings
from test_predict import (
    BAD_PHOTOS,
    CLASSES,
    EXIF_LATITUDE,
    EXIF_LONGITUDE,
    GOOD_PHOTOS,
    MODEL_SIZE,
    broken_embedding,
    broken_transform,
    make_photo_folder,
    random_photo,
    save_tiny_model,
)

import birder
from birder.errors import BirderError
from birder.inference import predictor as P
from birder.inference.classification import infer_image
from birder.io.journal import JOURNAL_DIR
from birder.runs import predict as prediction_run
from birder.runs.predict_options import ExecutionOptions, ModelOptions, OutputOptions
from birder.scripts.predict import main

ROOT = Path(__file__).resolve().parents[1]


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("birder-predict")
    return [str(script)] if script.exists() else [sys.executable, "-m", "birder.scripts.predict"]


def _run_cli(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [*_console_script(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240, **kwargs
    )


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _relative(path: str, root: Path) -> str:
    return Path(path).resolve().relative_to(root.resolve()).as_posix()


def _reference(model_path: Path, photos: Path) -> dict[str, np.ndarray]:
    """infer_image's probabilities for every good photo: what the command line must reproduce."""
    (net, info) = birder.load_model(model_path, inference=True)
    transform = birder.classification_transform(MODEL_SIZE, info.rgb_stats)
    return {name: infer_image(net, photos / name, transform)[0][0] for name in GOOD_PHOTOS}


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    return (save_tiny_model(tmp_path / "tiny.pt"), make_photo_folder(tmp_path / "photos"))


def test_console_script_end_to_end(setup, tmp_path: Path) -> None:
    (model, photos) = setup
    reference = _reference(model, photos)

    # Mode 1: CSV, worker processes, every output table, top-k = all classes (so probabilities sum to 1)
    out = tmp_path / "out-csv"
    args = ["--weights", str(model), str(photos), "--output-dir", str(out), "-j", "2", "-b", "4", "--top-k", "5"]
    args += ["--save-probabilities", "--save-logits", "--save-embeddings"]
    result = _run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "img/s" in result.stderr  # the progress bar
    assert f"Classified {len(GOOD_PHOTOS)} photos, {len(BAD_PHOTOS)} could not be read" in result.stdout
    assert "Accuracy on the 5 photos in folders named after a class" in result.stdout

    results = {_relative(row["path"], photos): row for row in _read_csv(out / "results.csv")}
    assert list(results) == sorted(GOOD_PHOTOS, key=lambda p: Path(p).parts)
    for name, row in results.items():
        top = [float(row[f"top{k}_prob"]) for k in range(1, 6)]
        assert sum(top) == pytest.approx(1.0, abs=1e-5)
        assert row["prediction"] == row["top1_class"] == CLASSES[int(np.argmax(reference[name]))]
    rotated = results["Species C/rotated.jpg"]
    assert rotated["exif_datetime"] == "2023-05-14T07:32:10"
    assert float(rotated["gps_latitude"]) == pytest.approx(EXIF_LATITUDE, abs=1e-6)
    assert float(rotated["gps_longitude"]) == pytest.approx(EXIF_LONGITUDE, abs=1e-6)
    assert results["Species A/rgb.jpg"]["gps_latitude"] == ""

    # One preprocessing path: the full probability table equals infer_image's
    for row in _read_csv(out / "probabilities.csv"):
        got = np.array([float(row[name]) for name in CLASSES])
        np.testing.assert_allclose(got, reference[_relative(row["path"], photos)], atol=1e-5)
    assert len(_read_csv(out / "logits.csv")) == len(GOOD_PHOTOS)
    assert len(_read_csv(out / "embeddings.csv")[0]) == 1 + 32

    failures = {_relative(row["path"], photos): row["error"] for row in _read_csv(out / "failures.csv")}
    assert set(failures) == set(BAD_PHOTOS)
    for name, word in BAD_PHOTOS.items():
        assert word in failures[name]
    assert not (out / JOURNAL_DIR).exists()

    # Mode 2: Parquet, TTA, a regional species list with an unknown name, --min-prob, no worker processes
    species = tmp_path / "species.txt"
    species.write_text("Species B\nSpecies D\nDodo\n")
    out = tmp_path / "out-parquet"
    args = ["-n", "vit_b16", "--weights", str(model), str(photos / "Species A"), str(photos / "loose")]
    args += ["--output-dir", str(out), "--format", "parquet", "--tta", "-j", "0", "--no-progress"]
    args += ["--species", str(species), "--min-prob", "0.99", "--save-embeddings"]
    result = _run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1 name(s)" in result.stderr and "Dodo" in result.stderr

    import pyarrow.parquet as pq

    table = pq.read_table(out / "results.parquet").to_pylist()
    assert [_relative(row["path"], photos) for row in table] == [
        "Species A/gray.png",
        "Species A/rgb.jpg",
        "loose/UPPER.JPEG",
    ]
    for row in table:
        assert {row["top1_class"], row["top2_class"]} == {"Species B", "Species D"}
        assert row["top1_prob"] + row["top2_prob"] == pytest.approx(1.0, abs=1e-5)
        assert row["prediction"] == "uncertain"
    # The embeddings as one FixedSizeList<float32> column of the model's width (32)
    embeddings = pq.read_table(out / "embeddings.parquet")
    assert embeddings.schema.names == ["path", "embedding"] and embeddings.num_rows == len(table)
    assert embeddings.schema.field("embedding").type.list_size == 32
    assert len(_read_csv(out / "failures.csv")) == len(BAD_PHOTOS)


def test_user_errors_exit_2_with_one_line(setup, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (model, photos) = setup
    result = _run_cli(["--weights", str(tmp_path / "missing.pt"), str(photos)], tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "missing.pt" in result.stderr

    (tmp_path / "empty").mkdir()
    (tmp_path / "bad-species.txt").write_text("Dodo\n")
    cases = {
        "unknown pretrained model 'vit_l16_mim-eu-commonn'": ["-n", "vit_l16_mim-eu-commonn", str(photos)],
        "no images found": ["--weights", str(model), str(tmp_path / "empty")],
        "does not exist": ["--weights", str(model), str(tmp_path / "nowhere")],
        "species file": ["--weights", str(model), str(photos), "--species", str(tmp_path / "none.txt")],
        "none of the 1 species": ["--weights", str(model), str(photos), "--species", str(tmp_path / "bad-species.txt")],
        "no model given": [str(photos)],
    }
    for message, args in cases.items():
        assert main([*args, "--no-progress"]) == 2, message
        err = capsys.readouterr().err.strip()
        assert message in err and err.startswith("birder-predict: error:") and "\n" not in err, err


def test_run_prediction_as_a_library(setup, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (model, photos) = setup
    options = prediction_run.PredictionOptions(
        [photos],
        model=ModelOptions(weights=model),
        execution=ExecutionOptions(num_workers=0, progress=False),
        output=OutputOptions(output_dir=tmp_path / "library", save_embeddings=True),
    )
    report = prediction_run.run_prediction(options)
    assert report.summary.classified == len(GOOD_PHOTOS) and report.summary.failures == len(BAD_PHOTOS)
    assert report.photos_this_run == len(GOOD_PHOTOS) + len(BAD_PHOTOS)
    tables = ("embeddings", "failures", "results")
    assert report.tables == {name: tmp_path / "library" / f"{name}.csv" for name in tables}
    assert f"Classified {len(GOOD_PHOTOS)} photos" in capsys.readouterr().out

    # The same tables as the command line with the same options
    args = ["--weights", str(model), str(photos), "-j", "0", "--no-progress", "--save-embeddings"]
    assert main([*args, "--output-dir", str(tmp_path / "cli")]) == 0
    _assert_same_tables(tmp_path / "library", tmp_path / "cli", tables)

    with pytest.raises(BirderError, match="no model given"):
        prediction_run.run_prediction(prediction_run.PredictionOptions([photos]))


def test_in_process_modes(setup, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (model, photos) = setup
    reference = _reference(model, photos)
    base = ["--weights", str(model), str(photos), "-j", "0", "--no-progress", "--top-k", "5"]

    for mode in (["--quantize", "int8"], ["--dtype", "bfloat16"], ["--amp"], ["--size", "48", "64"]):
        out = tmp_path / "-".join(mode)
        assert main([*base, *mode, "--output-dir", str(out)]) == 0, mode
        rows = _read_csv(out / "results.csv")
        assert len(rows) == len(GOOD_PHOTOS)
        for row in rows:
            assert sum(float(row[f"top{k}_prob"]) for k in range(1, 6)) == pytest.approx(1.0, abs=1e-5)
    capsys.readouterr()

    # Default output dir (results/ under the working directory), detection features, a picture
    assert main([*base, "--save-features", "--plot", "pictures/top.png", "--plot-max", "2"]) == 0
    assert Path("pictures/top.png").stat().st_size > 1000
    features = _read_csv(Path("results/features.csv"))
    assert len(features) == len(GOOD_PHOTOS)
    assert all((Path("results/features") / row["file"]).is_file() for row in features)
    rows = _read_csv(Path("results/results.csv"))
    for row in rows:
        expected = reference[_relative(row["path"], photos)]
        assert float(row["top1_prob"]) == pytest.approx(float(expected.max()), abs=1e-5)


def test_resume_after_kill_equals_uninterrupted_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = save_tiny_model(tmp_path / "tiny.pt")
    photos = tmp_path / "many"
    photos.mkdir()
    for i in range(60):
        random_photo(100 + i).save(photos / f"{i:03d}.jpg")
    (photos / "broken.jpg").write_text("no")
    args = ["--weights", str(model), str(photos), "-j", "0", "--no-progress", "--save-embeddings"]
    small_chunks = ["-b", "2", "--chunk-size", "2"]  # a durable write every 2 photos: the kill lands midway

    out = tmp_path / "resumed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [*_console_script(), *args, *small_chunks, "--output-dir", str(out)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    journal = out / JOURNAL_DIR / "results.r0.a0.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 3:  # header + at least one committed chunk
            break
        time.sleep(0.005)
    assert process.poll() is None, "the run finished before it could be killed: " + process.stderr.read().decode()
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert not (out / "results.csv").exists()
    done_before = journal.read_text().count("\n") - 1
    assert 2 <= done_before < 60

    assert main([*args, "--output-dir", str(out), "--resume"]) == 0
    assert "Resuming:" in capsys.readouterr().err
    assert main([*args, "--output-dir", str(tmp_path / "straight")]) == 0

    for table in ("results", "embeddings", "failures"):
        resumed = _read_csv(out / f"{table}.csv")
        straight = _read_csv(tmp_path / "straight" / f"{table}.csv")
        assert [r["path"] for r in resumed] == [r["path"] for r in straight]  # same order, no duplicates
        assert len({r["path"] for r in resumed}) == len(resumed)
        for a, b in zip(resumed, straight, strict=True):
            for key, value in a.items():
                if key.endswith("_prob") or key[1:].isdigit():
                    assert float(value) == pytest.approx(float(b[key]), abs=1e-5)
                elif key != "error":
                    assert value == b[key]
    assert len(_read_csv(out / "results.csv")) == 60
    assert not (out / JOURNAL_DIR).exists()

    # Resuming a finished run does nothing but rewrite the same tables
    assert main([*args, "--output-dir", str(out), "--resume"]) == 0
    assert "Resuming: 61 of 61 photos already done" in capsys.readouterr().err
    assert len(_read_csv(out / "results.csv")) == 60


def _run_in_own_session(command: list[str], cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``command``; on a timeout kill its whole process group (torchrun's workers too), not just the parent."""
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        (stdout, stderr) = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        (stdout, stderr) = process.communicate()
        pytest.fail(f"timed out after {timeout} s: {stdout}{stderr}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _torchrun() -> list[str]:
    found = shutil.which("torchrun")
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(setup, tmp_path: Path) -> None:
    (model, photos) = setup
    (photos / "Species D").mkdir()
    for i in range(9):  # an odd number of good photos: DistributedSampler would pad with a duplicate
        random_photo(200 + i).save(photos / f"Species D/extra{i}.png")
    args = ["--weights", str(model), str(photos), "-j", "1", "-b", "2", "--no-progress", "--save-probabilities"]

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [*_torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "birder.scripts.predict"]
    result = _run_in_own_session([*command, *args, "--output-dir", str(tmp_path / "dist")], tmp_path, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert main([*args, "--output-dir", str(tmp_path / "single")]) == 0

    for table in ("results", "probabilities", "failures"):
        dist = _read_csv(tmp_path / "dist" / f"{table}.csv")
        single = _read_csv(tmp_path / "single" / f"{table}.csv")
        assert [r["path"] for r in dist] == [r["path"] for r in single]
        assert len({r["path"] for r in dist}) == len(dist)
        for a, b in zip(dist, single, strict=True):
            if table == "results":
                assert a["top1_class"] == b["top1_class"]
            if table == "probabilities":
                np.testing.assert_allclose([float(a[c]) for c in CLASSES], [float(b[c]) for c in CLASSES], atol=1e-5)
    assert len(_read_csv(tmp_path / "dist" / "results.csv")) == len(GOOD_PHOTOS) + 9


@pytest.mark.slow
def test_compile_gives_the_same_probabilities(setup, tmp_path: Path) -> None:
    (model, photos) = setup
    args = ["--weights", str(model), str(photos / "Species A"), "-j", "0", "--no-progress", "--save-probabilities"]
    assert main([*args, "--output-dir", str(tmp_path / "eager")]) == 0
    assert main([*args, "--output-dir", str(tmp_path / "compiled"), "--compile"]) == 0
    eager = _read_csv(tmp_path / "eager" / "probabilities.csv")
    compiled = _read_csv(tmp_path / "compiled" / "probabilities.csv")
    for a, b in zip(eager, compiled, strict=True):
        np.testing.assert_allclose([float(a[c]) for c in CLASSES], [float(b[c]) for c in CLASSES], atol=1e-5)


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, batches: int) -> None:
    """Make the batch loop raise KeyboardInterrupt (a Ctrl-C) once ``batches`` batches have been classified."""
    original = P.Predictor.predict_tensor
    calls = {"n": 0}

    def interrupted(self, inputs):
        calls["n"] += 1
        if calls["n"] > batches:
            raise KeyboardInterrupt
        return original(self, inputs)

    monkeypatch.setattr(P.Predictor, "predict_tensor", interrupted)


def _assert_same_tables(got_dir: Path, expected_dir: Path, tables: tuple[str, ...]) -> None:
    for table in tables:
        got = _read_csv(got_dir / f"{table}.csv")
        expected = _read_csv(expected_dir / f"{table}.csv")
        assert [r["path"] for r in got] == [r["path"] for r in expected], table  # same order, no duplicates
        for a, b in zip(got, expected, strict=True):
            for key, value in a.items():
                if key.endswith("_prob") or key[1:].isdigit():
                    assert float(value) == pytest.approx(float(b[key]), abs=1e-5)
                else:
                    assert value == b[key]


def test_resume_with_inputs_in_another_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    model = save_tiny_model(tmp_path / "tiny.pt")
    (first, second) = (tmp_path / "a", tmp_path / "b")
    for folder, seed in ((first, 300), (second, 400)):
        folder.mkdir()
        for i in range(5):
            random_photo(seed + i).save(folder / f"{i}.jpg")
    (second / "broken.jpg").write_text("no")
    base = ["--weights", str(model), "-j", "0", "--no-progress", "--save-embeddings", "-b", "2", "--chunk-size", "2"]
    out = tmp_path / "resumed"

    codes = []
    with monkeypatch.context() as patch:
        _interrupt_after(patch, batches=4)  # every photo of a/, some of b/
        # No file left open, by the interrupted run (its journals) or by the resume (the tables it reads)
        interrupted = [*base, str(first), str(second), "--output-dir", str(out)]
        assert resource_warnings(lambda: codes.append(main(interrupted))) == []
    assert codes == [130]
    assert (out / JOURNAL_DIR).is_dir() and not (out / "results.csv").exists()

    resume = [*base, str(second), str(first), "--output-dir", str(out), "--resume"]
    assert resource_warnings(lambda: codes.append(main(resume))) == []
    assert codes[-1] == 0
    assert "Resuming: 8 of 11 photos already done" in capsys.readouterr().err
    assert main([*base, str(first), str(second), "--output-dir", str(tmp_path / "straight")]) == 0
    _assert_same_tables(out, tmp_path / "straight", ("results", "embeddings", "failures"))
    assert not (out / JOURNAL_DIR).exists()


def test_run_errors_stop_with_one_line_and_bad_photos_do_not(
    setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (model, photos) = setup
    base = ["--weights", str(model), str(photos), "--no-progress", "-b", "2"]

    # Corrupt files are the photos' failures: listed, and the run goes on
    assert main([*base, "-j", "0", "--output-dir", str(tmp_path / "ok")]) == 0
    capsys.readouterr()
    assert {_relative(row["path"], photos) for row in _read_csv(tmp_path / "ok" / "failures.csv")} == set(BAD_PHOTOS)
    assert len(_read_csv(tmp_path / "ok" / "results.csv")) == len(GOOD_PHOTOS)

    # A model that fails, or a transform that fails (in worker processes), is the run's failure
    with monkeypatch.context() as patch:
        patch.setattr(type(make_tiny_vit()), "embedding", broken_embedding)
        assert main([*base, "-j", "0", "--output-dir", str(tmp_path / "model")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("birder-predict: error:") and "mat1 and mat2 shapes" in err
    assert "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "model" / "results.csv").exists()

    with monkeypatch.context() as patch:
        patch.setattr("birder.runs.steps.classification_transform", lambda *args, **kwargs: broken_transform)
        assert main([*base, "-j", "2", "--output-dir", str(tmp_path / "transform")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("birder-predict: error:") and "RuntimeError: boom second line" in err and "\n" not in err
    assert not (tmp_path / "transform" / "failures.csv").exists()
