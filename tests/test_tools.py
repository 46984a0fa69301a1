"""``python -m birder.tools``: list-models, download-model, model-info, convert-model."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_vit
from test_predict import CLASSES, random_photo, save_tiny_model

import birder
from birder.inference.classification import infer_image
from birder.io.checkpoint import read_checkpoint
from birder.io.download import sha256_file
from birder.model_registry import registry
from birder.tools.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _register_loopback_model(http_server, tmp_path: Path, name: str = "tiny-island") -> Path:
    source = save_tiny_model(tmp_path / "source.pt")
    http_server.add(f"/zoo/{name}.pt", source.read_bytes())
    registry.register_weights(
        name,
        {
            "url": http_server.url("/zoo"),
            "description": "A tiny ViT for tests",
            "resolution": (32, 48),
            "formats": {"pt": {"file_size": round(source.stat().st_size / 2**20, 1), "sha256": sha256_file(source)}},
            "net": {"network": "vit_b16", "tag": "island"},
        },
    )
    return source


def test_module_entry_point_lists_networks() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "birder.tools", "list-models", "--filter", "vit_t16*"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [n for n in birder.list_models("vit_t16*")]


def test_list_models_tables(capsys: pytest.CaptureFixture, isolated_models_dir: Path) -> None:
    assert main(["list-models", "--pretrained"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("vit_l16_mim-eu-common"))
    for cell in ("vit_l16", "1160.1", "256x256", "ViT L/16, MIM pretraining, then fine-tuned on eu-common"):
        assert cell in line
    assert "size (MB)" in out and "resolution" in out and "description" in out

    isolated_models_dir.mkdir(parents=True)
    (isolated_models_dir / "vit_l16_mim_200.pt").write_bytes(b"placeholder")
    assert main(["list-models", "--pretrained", "--verbose", "--filter", "vit_l16_mim_*"]) == 0
    out = capsys.readouterr().out
    assert "vit_l16_mim-eu-common" not in out
    assert str(isolated_models_dir / "vit_l16_mim_200.pt") in out and "huggingface.co" in out

    assert main(["list-models", "--verbose", "--filter", "vit_t16"]) == 0
    out = capsys.readouterr().out
    assert "5.5" in out and "224x224" in out  # ViT-T/16 without its head: 5.5 M parameters
    assert main(["list-models", "--filter", "nothing*"]) == 0
    assert "no networks match" in capsys.readouterr().out


def test_download_model_caches_and_forces(
    http_server, restore_manifest, tmp_path: Path, isolated_models_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    source = _register_loopback_model(http_server, tmp_path)
    assert main(["download-model", "tiny-island", "--no-progress"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == isolated_models_dir / "tiny-island.pt" and path.read_bytes() == source.read_bytes()
    assert main(["download-model", "tiny-island", "--no-progress"]) == 0  # verified copy present: no request
    assert http_server.requests["/zoo/tiny-island.pt"] == 1
    assert main(["download-model", "tiny-island", "--no-progress", "--force"]) == 0
    assert http_server.requests["/zoo/tiny-island.pt"] == 2
    capsys.readouterr()

    assert main(["download-model", "tiny-island", "--format", "safetensors"]) == 2
    assert "no 'safetensors' file; available formats: pt" in capsys.readouterr().err
    assert main(["download-model", "tiny-islnd"]) == 2
    assert "did you mean tiny-island" in capsys.readouterr().err


def test_model_info_of_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = save_tiny_model(tmp_path / "tiny.safetensors")
    assert main(["model-info", str(path)]) == 0
    out = capsys.readouterr().out
    (state, _) = read_checkpoint(path)
    parameters = sum(t.numel() for t in state.values())
    assert f"parameters:      {parameters:,}" in out
    assert "network:         vit_b16" in out and "input:           3 x 32 x 48" in out
    assert "rgb stats:       mean (0.52, 0.53, 0.49)" in out
    assert f"classes (5): {', '.join(CLASSES)}" in out

    assert main(["model-info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["classes"] == CLASSES and info["num_classes"] == 5 and info["parameters"] == parameters
    assert info["signature"]["outputs"][0]["data_shape"] == [0, 5]

    assert main(["model-info", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_model_info_of_a_name_shows_the_file_once_cached(
    http_server, restore_manifest, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["model-info", "vit_l16_mim-eu-common"]) == 0
    out = capsys.readouterr().out
    assert "3b7235b90f76fb1e0e36d4c4111777a4cc4e4500552fe840c51170b208310d16" in out
    assert "cached:          no (python -m birder.tools download-model vit_l16_mim-eu-common)" in out

    _register_loopback_model(http_server, tmp_path)
    assert main(["download-model", "tiny-island", "--no-progress"]) == 0
    assert main(["model-info", "tiny-island", "--classes"]) == 0
    out = capsys.readouterr().out
    assert "A tiny ViT for tests" in out and "network / tag:   vit_b16 / island" in out
    assert "parameters:" in out and "    4  Species E" in out  # the checkpoint's contents, every class listed
    assert main(["model-info", "vit_l16_mim-eu-comon"]) == 2
    err = capsys.readouterr().err
    assert "not a model file" in err and "did you mean vit_l16_mim-eu-common" in err


def test_convert_round_trip_keeps_predictions(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = save_tiny_model(tmp_path / "tiny.pt")
    assert main(["convert-model", str(source), str(tmp_path / "tiny.safetensors")]) == 0
    assert main(["convert-model", str(tmp_path / "tiny.safetensors"), str(tmp_path / "back.pt")]) == 0
    photo = random_photo(0)
    (original, _) = read_checkpoint(source)
    outputs = []
    for path in (source, tmp_path / "tiny.safetensors", tmp_path / "back.pt"):
        (state, _) = read_checkpoint(path)
        assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)
        (net, info) = birder.load_model(path, inference=True)
        transform = birder.classification_transform(birder.get_size_from_signature(info.signature), info.rgb_stats)
        outputs.append(infer_image(net, photo, transform)[0])
        assert list(info.class_to_idx) == CLASSES
    # Same weights; memory-mapped and loaded tensors may take different SIMD paths, hence not bit-exact
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-6)
    np.testing.assert_allclose(outputs[0], outputs[2], atol=1e-6)
    capsys.readouterr()

    assert main(["convert-model", str(source), str(tmp_path / "back.pt")]) == 2
    assert "already exists: add --overwrite to replace it" in capsys.readouterr().err
    assert main(["convert-model", str(source), str(tmp_path / "back.pt"), "--force"]) == 0
    assert main(["convert-model", str(source), str(tmp_path / "model.txt")]) == 2
    assert "extension must be one of .pt, .safetensors, .pts, .pt2, .onnx" in capsys.readouterr().err
    assert main(["convert-model", "nothing-here", str(tmp_path / "x.pt")]) == 2


def test_convert_keeps_the_task_of_an_encoder(tmp_path: Path) -> None:
    net = make_tiny_vit(num_classes=0)
    info = birder.ModelInfo({}, None, {"mean": (0.5,) * 3, "std": (0.5,) * 3})
    birder.save_model(net, tmp_path / "encoder.pt", info, task="masked_image_modeling")
    assert main(["convert-model", str(tmp_path / "encoder.pt"), str(tmp_path / "encoder.safetensors")]) == 0
    (state, metadata) = read_checkpoint(tmp_path / "encoder.safetensors")
    assert metadata["task"] == "masked_image_modeling" and metadata["class_to_idx"] == {}
    torch.testing.assert_close(state["pos_embedding"], net.pos_embedding.detach())


def test_convert_to_export_formats_goes_through_export_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def export_model(net, path, model_info, *, task="image_classification"):
        calls.append((net.network_name, Path(path).suffix, list(model_info.class_to_idx), task))
        Path(path).write_bytes(b"exported")
        return Path(path)

    monkeypatch.setitem(sys.modules, "birder.io.export", types.SimpleNamespace(export_model=export_model))
    source = save_tiny_model(tmp_path / "tiny.pt")
    for suffix in (".pts", ".pt2", ".onnx"):
        assert main(["convert-model", str(source), str(tmp_path / f"tiny{suffix}")]) == 0
    assert calls == [("vit_b16", s, CLASSES, "image_classification") for s in (".pts", ".pt2", ".onnx")]
