"""Round trips through every portable format: outputs within 1e-4 of the original, metadata intact."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_VIT_CONFIG, make_tiny_vit

import birder
from birder.errors import CheckpointError
from birder.inference.classification import infer_batch
from birder.io.checkpoint import ModelInfo, make_signature
from birder.io.export import (
    EXPORT_FORMATS,
    export_model,
    load_exported,
    onnx_metadata_path,
    read_export_metadata,
)

TOLERANCE = 1e-4
SIZE = (32, 48)
RGB_STATS = {"mean": [0.5191, 0.5306, 0.4877], "std": [0.2316, 0.2304, 0.2588]}
CLASSES = {"Eurasian Wren": 0, "European Robin": 1, "Great Tit": 2, "Common Blackbird": 3, "Eurasian Blue Tit": 4}
ALL_FORMATS = ("safetensors", *EXPORT_FORMATS)


def model_info(num_classes: int) -> ModelInfo:
    class_to_idx = {name: index for (name, index) in CLASSES.items() if index < num_classes}
    return ModelInfo(class_to_idx, make_signature(3, SIZE, num_classes), RGB_STATS)


def save(net: torch.nn.Module, path: Path, info: ModelInfo) -> Path:
    return birder.save_model(net, path, info) if path.suffix == ".safetensors" else export_model(net, path, info)


def load(path: Path) -> tuple[torch.nn.Module, ModelInfo]:
    if path.suffix == ".safetensors":
        return birder.load_model(path, inference=True)
    return load_exported(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], Path]:
    """Each format written once, for a classifier (5 classes) and a headless encoder (0 classes)."""
    directory = tmp_path_factory.mktemp("exports")
    paths = {}
    for num_classes in (5, 0):
        net = make_tiny_vit(num_classes=num_classes, size=SIZE, seed=num_classes)
        for file_format in ALL_FORMATS:
            paths[(file_format, num_classes)] = save(
                net, directory / f"tiny_{num_classes}.{file_format}", model_info(num_classes)
            )
    return paths


@pytest.mark.parametrize("num_classes", [5, 0], ids=["classifier", "headless"])
@pytest.mark.parametrize("file_format", ALL_FORMATS)
def test_round_trip_outputs_match(exported: dict[tuple[str, int], Path], file_format: str, num_classes: int) -> None:
    original = make_tiny_vit(num_classes=num_classes, size=SIZE, seed=num_classes)
    (loaded, _) = load(exported[(file_format, num_classes)])
    inputs = torch.randn(3, 3, *SIZE, generator=torch.Generator().manual_seed(1))  # not the traced batch size

    with torch.inference_mode():
        expected_logits = original(inputs)
        expected_embedding = original.embedding(inputs)
        logits = loaded(inputs)
        embedding = loaded.embedding(inputs)
        classified = loaded.classify(expected_embedding)

    assert logits.shape == expected_logits.shape
    torch.testing.assert_close(logits, expected_logits, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(embedding, expected_embedding, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(classified, expected_logits, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("file_format", ALL_FORMATS)
def test_round_trip_keeps_the_metadata(exported: dict[tuple[str, int], Path], file_format: str) -> None:
    (_, info) = load(exported[(file_format, 5)])
    assert info.class_to_idx == CLASSES
    assert info.signature == make_signature(3, SIZE, 5)
    assert {key: list(value) for key, value in info.rgb_stats.items()} == RGB_STATS
    assert info.custom_config == TINY_VIT_CONFIG


@pytest.mark.parametrize("file_format", EXPORT_FORMATS)
def test_exports_carry_the_spec_metadata_keys(exported: dict[tuple[str, int], Path], file_format: str) -> None:
    metadata = read_export_metadata(exported[(file_format, 5)])
    assert {"birder_version", "task", "class_to_idx", "signature", "rgb_stats"} <= set(metadata)
    assert metadata["birder_version"] == f"v{birder.__version__}"
    assert metadata["task"] == "image_classification"
    assert metadata["network"] == "vit_b16"


@pytest.mark.parametrize("file_format", EXPORT_FORMATS)
def test_loaded_exports_run_through_infer_batch(exported: dict[tuple[str, int], Path], file_format: str) -> None:
    original = make_tiny_vit(num_classes=5, size=SIZE, seed=5)
    (loaded, _) = load_exported(exported[(file_format, 5)])
    inputs = torch.randn(4, 3, *SIZE, generator=torch.Generator().manual_seed(2))
    (expected_probs, expected_embedding) = infer_batch(original, inputs, return_embedding=True)
    (probs, embedding) = infer_batch(loaded, inputs, return_embedding=True)
    assert abs(probs - expected_probs).max() < 1e-5
    assert abs(embedding - expected_embedding).max() < TOLERANCE


def test_onnx_sidecar_is_the_spec_json(exported: dict[tuple[str, int], Path]) -> None:
    path = exported[("onnx", 5)]
    sidecar = onnx_metadata_path(path)
    assert sidecar.name == "tiny_5.onnx_metadata.json"
    metadata = json.loads(sidecar.read_text())
    assert metadata["class_to_idx"] == CLASSES
    assert metadata["signature"] == make_signature(3, SIZE, 5)
    assert metadata["rgb_stats"] == RGB_STATS
    # Nothing else is left beside the exports (no temporary files, no external weights for a small model).
    names = sorted(p.name for p in path.parent.iterdir())
    assert not [name for name in names if name.startswith(".") or name.endswith(".data")], names


def test_onnx_without_its_sidecar_reads_the_embedded_copy(
    exported: dict[tuple[str, int], Path], tmp_path: Path
) -> None:
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(exported[("onnx", 5)].read_bytes())
    (_, info) = load_exported(lone)
    assert info.class_to_idx == CLASSES
    assert info.custom_config == TINY_VIT_CONFIG


def test_export_leaves_the_network_in_its_mode(tmp_path: Path) -> None:
    net = make_tiny_vit().train()
    export_model(net, tmp_path / "m.pts", model_info(5))
    assert net.training


def test_unsupported_missing_and_broken_files_fail_clearly(tmp_path: Path) -> None:
    net = make_tiny_vit()
    with pytest.raises(CheckpointError, match="unsupported export extension"):
        export_model(net, tmp_path / "m.tflite", model_info(5))
    with pytest.raises(CheckpointError, match="no such model file"):
        load_exported(tmp_path / "absent.pt2")
    for name in ("broken.pts", "broken.pt2", "broken.onnx"):
        (tmp_path / name).write_bytes(b"definitely not a model")
        with pytest.raises(CheckpointError, match="broken"):
            load_exported(tmp_path / name)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")  # plain torch.jit.trace
def test_torchscript_without_birder_metadata_is_refused(tmp_path: Path) -> None:
    net = make_tiny_vit()
    path = tmp_path / "plain.pts"
    torch.jit.save(torch.jit.trace(net, torch.randn(2, 3, *SIZE), check_trace=False), str(path))
    with pytest.raises(CheckpointError, match="not a birder export"):
        load_exported(path)


@pytest.mark.parametrize("file_format", EXPORT_FORMATS)
def test_model_info_describes_an_export(
    exported: dict[tuple[str, int], Path], file_format: str, capsys: pytest.CaptureFixture
) -> None:
    """``model-info`` (plain text, no --json) on an export: its metadata, no crash on the uncounted parameters."""
    from birder.tools.cli import main

    assert main(["model-info", str(exported[(file_format, 5)])]) == 0
    out = capsys.readouterr().out
    assert "input:           3 x 32 x 48" in out
    assert "Eurasian Wren" in out
    assert "parameters:      not counted for exports" in out
