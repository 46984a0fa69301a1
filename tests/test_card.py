"""The model card's code runs verbatim and gives the shapes the card promises.

The card's weights (1.2 GB) cannot be downloaded here, so the test writes a checkpoint of the card's network
with fewer blocks (same width, resolution and classes: the promised shapes hold), serves it from a loopback HTTP
server and points the name ``vit_l16_mim-eu-common`` at it with ``register_weights``. The card's lines
themselves are untouched.
"""

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, LoopbackServer
from PIL import Image

import birder
from birder.io.checkpoint import make_signature
from birder.model_registry import registry

CARD_NAME = "vit_l16_mim-eu-common"

# The card's code, verbatim: the code block of SPEC section 1, copied into the fixtures (after one header line).
CARD_FIXTURE = FIXTURES / "model_card.py.txt"
CARD_CODE = CARD_FIXTURE.read_text().split("\n", 1)[1]
CARD_CODE_SHA256 = "1a9554eecacba36358c4af6dab4d24a7194e1a42cba9e9bd8e6226cad8d18950"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)

    return digest.hexdigest()


def _publish_card_model(net, tmp_path: Path, server: LoopbackServer) -> None:
    """Save ``net`` as the card's file and register the card's name to download it from ``server``."""
    class_to_idx = {f"species_{index:03d}": index for index in range(707)}
    info = birder.ModelInfo(
        class_to_idx,
        make_signature(3, (256, 256), 707),
        {"mean": (0.5248, 0.5372, 0.5086), "std": (0.2135, 0.2103, 0.2622)},
    )
    path = birder.save_model(net, tmp_path / "published" / f"{CARD_NAME}.pt", info)
    server.add(f"/birder-project/{CARD_NAME}/{CARD_NAME}.pt", path)
    entry = registry.get_pretrained_metadata(CARD_NAME)
    entry["url"] = server.url(f"/birder-project/{CARD_NAME}")
    entry["formats"] = {"pt": {"file_size": path.stat().st_size / 2**20, "sha256": _sha256(path)}}
    registry.register_weights(CARD_NAME, entry)


def _run_card(tmp_path: Path) -> dict:
    photo_dir = tmp_path / "path" / "to"
    photo_dir.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(photo_dir / "image.jpeg")
    namespace = {"image": Image.open(photo_dir / "image.jpeg")}
    exec(CARD_CODE, namespace)
    return namespace


def _check_card_promises(namespace: dict) -> None:
    assert namespace["size"] == (256, 256)
    assert namespace["out"].shape == (1, 707)
    np.testing.assert_allclose(namespace["out"].sum(), 1.0, rtol=1e-4)
    assert namespace["embedding"].shape == (1, 1024)
    assert list(namespace["features"]) == ["neck"]
    assert namespace["features"]["neck"].shape == (1, 1024, 16, 16)


def test_card_code_fixture_is_the_card() -> None:
    # The fixture stays the card's code byte for byte (the hash was taken when it was copied from SPEC section 1).
    (header, _) = CARD_FIXTURE.read_text().split("\n", 1)
    assert header.startswith("# Verbatim copy of the code block of SPEC.md section 1")
    assert hashlib.sha256(CARD_CODE.encode()).hexdigest() == CARD_CODE_SHA256
    assert CARD_CODE.startswith("import birder\n") and CARD_CODE.endswith('{"neck": Tensor[1, 1024, 16, 16]}\n')


DOCUMENTS_QUOTING_THE_CARD = [
    ("README.md", "## Use the card's model in Python"),
    ("docs/compatibility.md", "## Model card"),
]


@pytest.mark.parametrize(("document", "heading"), DOCUMENTS_QUOTING_THE_CARD)
def test_documents_quote_the_card_verbatim(document: str, heading: str) -> None:
    text = (Path(__file__).resolve().parents[1] / document).read_text()
    block = re.search(re.escape(heading) + r"\n.*?```python\n(.*?)```", text, re.DOTALL)
    assert block is not None
    assert block.group(1) == CARD_CODE


def test_card_code_runs(tmp_path: Path, http_server: LoopbackServer, restore_manifest) -> None:
    torch.manual_seed(0)
    # The card's network with 1 block and a narrow MLP: same width (1024), input (256 px) and classes (707).
    net = registry.net_factory("vit_l16", 707, config={"num_layers": 1, "mlp_dim": 256}, size=(256, 256))
    _publish_card_model(net, tmp_path, http_server)

    namespace = _run_card(tmp_path)
    _check_card_promises(namespace)
    assert http_server.requests[f"/birder-project/{CARD_NAME}/{CARD_NAME}.pt"] == 1

    # A second load uses the verified cache: no new request.
    birder.load_pretrained_model(CARD_NAME, inference=True, progress_bar=False)
    assert sum(http_server.requests.values()) == 1


@pytest.mark.slow
def test_card_code_runs_full_size(tmp_path: Path, http_server: LoopbackServer, restore_manifest) -> None:
    free = shutil.disk_usage(tmp_path).free
    if free < 3 * 2**30:
        pytest.skip(f"needs 3 GB free disk for two copies of the 1.2 GB checkpoint, {free / 2**30:.1f} GB free")

    torch.manual_seed(0)
    net = registry.net_factory("vit_l16", 707, size=(256, 256))
    assert sum(p.numel() for p in net.parameters()) == 304_087_747
    _publish_card_model(net, tmp_path, http_server)
    del net

    namespace = _run_card(tmp_path)
    _check_card_promises(namespace)
    assert sum(p.numel() for p in namespace["net"].parameters()) == 304_087_747
