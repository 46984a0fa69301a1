"""Golden outputs of ``birder-predict``: a fixed photo folder and a fixed model must give these exact tables.

A safety net for refactoring the prediction pipeline: any change to what ``birder-predict`` writes (rows, their
order, columns, numbers, failure reasons, the summary) fails this test. Everything is generated here, seeded:
lossless images (PNG, BMP, GIF: no codec version can change their pixels) and a tiny ViT whose weights come
from numpy's seeded generator rather than torch's initializers (so a change to the network's init code does not
move the goldens; only its forward pass matters). Paths are stored relative to the test's folder.

Regenerating the goldens (only after a change of behaviour that is intended, reviewed and explained)::

    BIRDER_REGENERATE_GOLDEN=1 python -m pytest tests/test_predict_golden.py

then review ``git diff tests/fixtures/golden_predict/``.
"""

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_torch_thread
from PIL import Image

import birder
from birder.model_registry import registry
from birder.scripts.predict import main

GOLDEN_DIR = Path(__file__).parent / "fixtures" / "golden_predict"
REGENERATE = os.environ.get("BIRDER_REGENERATE_GOLDEN") == "1"
TABLES = ("results", "probabilities", "logits", "embeddings", "failures")
CLASSES = ["Species A", "Species B", "Species C", "Species D", "Species E"]
RGB_STATS = {"mean": (0.52, 0.53, 0.49), "std": (0.23, 0.23, 0.26)}
MODEL_SIZE = (32, 48)
# Pinned here, not shared with other tests: the goldens depend on it
MODEL_CONFIG = {"hidden_dim": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 64}
# Numbers: float32 arithmetic may differ in the last bits between CPUs (AVX2 and AVX-512 kernels add in other
# orders: seen as 1.4e-6 on an embedding of 1.4, about 12 float32 ulps); 6-decimal columns (probabilities in the
# results table) may also round to the neighbouring last digit. A value passes within ATOL + RTOL * |golden|.
ATOL = 1e-6
RTOL = 2e-6
ATOL_SIX_DECIMALS = 1.5e-6
# The options under test: every table, top-k below the class count, an "uncertain" threshold, small batches,
# two folders named in reverse order plus a single file.
OPTIONS = ["--save-embeddings", "--save-probabilities", "--save-logits", "--top-k", "3", "--min-prob", "0.45"]
OPTIONS += ["-b", "4", "-j", "0", "--no-progress"]
INPUTS = ["photos/site2", "photos/site1", "photos/extra/single.png"]


@pytest.fixture
def single_thread() -> Iterator[None]:
    """One thread: reductions split across threads can differ in the last bits."""
    with one_torch_thread():
        yield


# ---------------------------------------------------------------------------------------------------------------------
# The fixed inputs
# ---------------------------------------------------------------------------------------------------------------------


def _pixels(seed: int, width: int, height: int, bands: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # A smooth gradient plus noise: a resize has something to interpolate, unlike pure noise
    ramp = np.linspace(0, 160, width)[None, :, None] + np.linspace(0, 60, height)[:, None, None]
    noise = rng.integers(0, 96, size=(height, width, bands))
    return np.clip(ramp + noise, 0, 255).astype(np.uint8)


def _exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    exif.get_ifd(0x8769)[0x9003] = "2021:06:01 05:42:00"
    exif.get_ifd(0x8825).update({1: "N", 2: (60.0, 10.0, 30.0), 3: "E", 4: (24.0, 56.0, 15.0)})
    return exif


def make_golden_photos(root: Path) -> Path:
    """13 files in nested folders: 10 photos of several modes and formats, 2 unreadable ones, and files to skip."""
    photos = {
        "site1/Species A/a1.png": Image.fromarray(_pixels(1, 60, 40)),
        "site1/Species A/a2.png": Image.fromarray(_pixels(2, 48, 64)),
        "site1/Species B/b1.png": Image.fromarray(_pixels(3, 50, 50, 1)[:, :, 0]),  # grayscale
        "site1/Species B/b2.png": Image.fromarray(_pixels(4, 40, 30, 4)),  # RGBA: composited on white
        "site1/Species B/deep/nested/b3.png": Image.fromarray(_pixels(5, 64, 48)).convert("P"),
        "site2/Species C/c1.bmp": Image.fromarray(_pixels(6, 44, 36)),
        "site2/Species D/d1.gif": Image.fromarray(_pixels(7, 36, 44)).convert("P"),
        "site2/Species E/e1.png": Image.fromarray(_pixels(8, 70, 30)),
        "extra/single.png": Image.fromarray(_pixels(9, 30, 70)),
    }
    for name, image in photos.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / name)
    (root / "site1/loose").mkdir()
    Image.fromarray(_pixels(10, 64, 40)).save(root / "site1/loose/field.png", exif=_exif())  # date, GPS, rotation

    (root / "site1/loose/notes.jpg").write_text("field notes, not a photo\n")  # unreadable
    (root / "site2/empty.png").write_bytes(b"")  # unreadable
    (root / "site2/readme.txt").write_text("not an image extension: skipped\n")
    (root / "site2/._e1.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # hidden: skipped
    (root / "site2/.thumbnails").mkdir()
    Image.fromarray(_pixels(11, 16, 16)).save(root / "site2/.thumbnails/t.png")  # hidden folder: skipped
    return root


def make_golden_model(path: Path) -> Path:
    """A tiny ViT with weights drawn from numpy's seeded generator, saved with ``birder.save_model``."""
    net = registry.net_factory("vit_b16", len(CLASSES), config=MODEL_CONFIG, size=MODEL_SIZE).eval()
    rng = np.random.default_rng(2024)
    state = {}
    for name, tensor in sorted(net.state_dict().items()):
        values = rng.normal(0.0, 0.2, size=tuple(tensor.shape))
        if "norm" in name and name.endswith("weight"):
            values += 1.0  # LayerNorm scales around 1, as trained networks have
        state[name] = torch.from_numpy(values).to(tensor.dtype)
    net.load_state_dict(state)
    info = birder.ModelInfo({name: i for (i, name) in enumerate(CLASSES)}, None, RGB_STATS)
    return birder.save_model(net, path, info)


# ---------------------------------------------------------------------------------------------------------------------
# Normalized outputs
# ---------------------------------------------------------------------------------------------------------------------


def _relative(path: str, root: Path) -> str:
    """A table's path as a POSIX path relative to the test folder (absolute tmp paths vary from run to run)."""
    if os.path.isabs(path):
        path = os.path.relpath(path, root)
    return Path(path).as_posix()


def _read_table(path: Path, root: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    return [rows[0], *([_relative(row[0], root), *row[1:]] for row in rows[1:])]


def _summary(output_dir: Path) -> dict:
    """What else a run leaves that must not change: its files and run.json's summary (not timings or devices)."""
    info = json.loads((output_dir / "run.json").read_text(encoding="utf-8"))
    return {"files": sorted(p.name for p in output_dir.iterdir()), "summary": info["summary"]}


def _write_golden(tables: dict[str, list[list[str]]], summary: dict) -> None:
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for name, rows in tables.items():
        with open(GOLDEN_DIR / f"{name}.csv", "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle, lineterminator="\n").writerows(rows)
    (GOLDEN_DIR / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _assert_same_table(name: str, got: list[list[str]], expected: list[list[str]]) -> None:
    assert got[0] == expected[0], f"{name}: other columns"
    assert [row[0] for row in got[1:]] == [row[0] for row in expected[1:]], f"{name}: other photos or order"
    for got_row, expected_row in zip(got[1:], expected[1:], strict=True):
        for column, a, b in zip(got[0], got_row, expected_row, strict=True):
            where = f"{name}.csv, {expected_row[0]}, column {column}"
            if _is_number(b) and column != "path":
                tolerance = ATOL_SIX_DECIMALS if column.endswith("_prob") else ATOL + RTOL * abs(float(b))
                assert _is_number(a) and abs(float(a) - float(b)) <= tolerance, f"{where}: {a} != {b}"
            else:
                assert a == b, f"{where}: {a!r} != {b!r}"


# ---------------------------------------------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------------------------------------------


def test_predict_matches_golden_outputs(tmp_path: Path, single_thread: None, capsys: pytest.CaptureFixture) -> None:
    # The working directory is tmp_path (conftest): inputs and table paths are relative to it
    make_golden_photos(tmp_path / "photos")
    model = make_golden_model(tmp_path / "golden-vit.pt")
    output_dir = tmp_path / "out"
    assert main(["--weights", str(model), *INPUTS, *OPTIONS, "--output-dir", str(output_dir)]) == 0
    capsys.readouterr()

    tables = {name: _read_table(output_dir / f"{name}.csv", tmp_path) for name in TABLES}
    summary = _summary(output_dir)
    if REGENERATE:
        _write_golden(tables, summary)
        pytest.skip(f"golden files regenerated in {GOLDEN_DIR}: review them with git diff")

    assert summary == json.loads((GOLDEN_DIR / "summary.json").read_text(encoding="utf-8"))
    for name in TABLES:
        _assert_same_table(name, tables[name], _read_table(GOLDEN_DIR / f"{name}.csv", tmp_path))


def test_golden_run_is_deterministic(tmp_path: Path, single_thread: None, capsys: pytest.CaptureFixture) -> None:
    """Two runs (one with worker processes and other batches) give the same tables: the goldens are stable."""
    make_golden_photos(tmp_path / "photos")
    model = make_golden_model(tmp_path / "golden-vit.pt")
    outputs = []
    for extra in ([], ["-b", "3", "-j", "2"]):
        output_dir = tmp_path / f"out{len(outputs)}"
        assert main(["--weights", str(model), *INPUTS, *OPTIONS, *extra, "--output-dir", str(output_dir)]) == 0
        outputs.append({name: _read_table(output_dir / f"{name}.csv", tmp_path) for name in TABLES})
    capsys.readouterr()
    for name in TABLES:
        _assert_same_table(name, outputs[1][name], outputs[0][name])
