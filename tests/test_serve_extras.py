"""birder-serve: /v1/explain, and /v1/similar with an index (only recorded photos served)."""

import base64
import io
from pathlib import Path

import pytest
import torch
from conftest import TINY_VIT_CONFIG
from PIL import Image

import birder
from birder.model_registry import registry

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
from fastapi.testclient import TestClient

from birder.search.build import IndexOptions, run_index
from birder.search.store import PhotoIndex
from birder.serve.app import create_app

STATS = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def png(colour, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_explain_and_similar(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = registry.net_factory("vit_b16", 3, config={**TINY_VIT_CONFIG, "patch_size": 8}, size=(32, 32))
    info = birder.ModelInfo({"a": 0, "b": 1, "c": 2}, None, STATS)
    birder.save_model(net, tmp_path / "tiny.pt", info)
    for index in range(5):
        (tmp_path / "photos").mkdir(exist_ok=True)
        (tmp_path / "photos" / f"{index}.png").write_bytes(png((50 * index, 80, 200 - 40 * index)))
    options = IndexOptions([tmp_path / "photos"], tmp_path / "index", weights=tmp_path / "tiny.pt", num_workers=0)
    options.progress = False
    run_index(options, add=False)
    (net, info) = birder.load_model(tmp_path / "tiny.pt", inference=True)
    app = create_app(net, info, photo_index=PhotoIndex(tmp_path / "index"))
    with TestClient(app) as client:
        answer = client.post("/v1/explain?method=gradcam&target=b", files={"image": ("x.png", png((10, 200, 10)))})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["target"] == {"species": "b", "index": 1} and body["image"] == {"width": 40, "height": 30}
        overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay"].split(",", 1)[1])))
        assert overlay.mode == "RGBA" and overlay.size == (40, 30)
        assert client.post("/v1/explain?method=magic", files={"image": ("x.png", png((1, 2, 3)))}).status_code == 400
        assert client.post("/v1/explain", files={"image": ("x.png", b"not an image")}).status_code == 422

        similar = client.post("/v1/similar?k=3", files={"image": ("x.png", png((100, 80, 120)))})
        assert similar.status_code == 200, similar.text
        results = similar.json()["results"]
        assert len(results) == 3 and results[0]["similarity"] >= results[1]["similarity"]
        assert results[0]["path"].endswith("2.png")  # the same colour as photo 2
        thumbnail = client.get(results[0]["photo_url"])
        assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
        assert client.get("/v1/similar/photos/99").status_code == 404
        assert client.get("/v1/similar/photos/..%2F..%2Fetc%2Fpasswd").status_code in (400, 404, 422)
