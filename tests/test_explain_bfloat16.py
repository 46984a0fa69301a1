"""Gradient maps (HiResCAM, Grad-CAM, LayerCAM) of networks running in bfloat16, as ``--dtype auto`` picks on GPUs
and on CPUs with native bf16: the maps are computed in float32 from the bf16 activations and gradients."""

import base64
import copy
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VIT_CONFIG
from PIL import Image

import birder
from birder.introspection import explain_tensor
from birder.model_registry import registry

pytest.importorskip("pytorch_grad_cam")

STATS = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
CAM_METHODS = ("hirescam", "gradcam", "layercam")


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return registry.net_factory("vit_b16", 4, config={**TINY_VIT_CONFIG, "patch_size": 8}, size=(32, 32)).eval()


@pytest.mark.parametrize("method", CAM_METHODS)
def test_gradient_maps_of_a_bfloat16_network_match_its_float32_maps(method: str) -> None:
    net = tiny_vit()
    half = copy.deepcopy(net).to(torch.bfloat16)
    inputs = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = [0, 1, 3]

    (expected, _) = explain_tensor(net, inputs, method, targets)
    (maps, probabilities) = explain_tensor(half, inputs, method, targets)

    assert maps.dtype == torch.float32 and maps.shape == (3, 32, 32) and probabilities.shape == (3, 4)
    assert bool(torch.isfinite(maps).all()) and float(maps.min()) >= 0.0
    # bf16 keeps 8 bits of mantissa: the maps agree to a few thousandths of their range (measured: under 0.01)
    assert float((maps - expected).abs().max()) < 0.05
    # The network was explained as it is: no float32 copy of its weights was made for it
    assert {param.dtype for param in half.parameters()} == {torch.bfloat16}


def test_predict_writes_hirescam_overlays_with_a_bfloat16_network(tmp_path: Path) -> None:
    from birder.scripts import predict

    birder.save_model(tiny_vit(), tmp_path / "tiny.pt", birder.ModelInfo({f"c{i}": i for i in range(4)}, None, STATS))
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(2):
        Image.new("RGB", (40 + 10 * index, 30), (30 * index, 90, 30)).save(photos / f"{index}.png")
    argv = [str(photos), "--weights", str(tmp_path / "tiny.pt"), "-j", "0", "--no-progress", "--dtype", "bfloat16"]
    argv += ["--output-dir", str(tmp_path / "out"), "--explain", str(tmp_path / "maps"), "--explain-method", "hirescam"]

    assert predict.main(argv) == 0
    overlays = sorted((tmp_path / "maps").glob("*.png"))
    assert sorted(Image.open(path).size for path in overlays) == [(40, 30), (50, 30)]


def test_served_bfloat16_network_explains_with_every_method(tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from birder.scripts.serve import apply_dtype
    from birder.serve.app import create_app

    birder.save_model(tiny_vit(), tmp_path / "tiny.pt", birder.ModelInfo({f"c{i}": i for i in range(4)}, None, STATS))
    (net, info) = birder.load_model(tmp_path / "tiny.pt", inference=True)
    (net, dtype) = apply_dtype(net, "bfloat16")
    photo = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(photo, "PNG")
    with TestClient(create_app(net, info, dtype=dtype)) as client:
        for method in ("rollout", *CAM_METHODS):
            answer = client.post(f"/v1/explain?method={method}&target=c2", files={"image": ("p.png", photo.getvalue())})
            assert answer.status_code == 200, (method, answer.text)
            assert answer.json()["target"] == {"species": "c2", "index": 2}
            overlay = Image.open(io.BytesIO(base64.b64decode(answer.json()["overlay"].split(",", 1)[1])))
            assert overlay.mode == "RGBA" and overlay.size == (40, 30)
