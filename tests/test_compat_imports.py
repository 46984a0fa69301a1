"""Code written for the published Birder runs as written: every call of its import forms, in all three spellings.

The forms (``docs/compatibility.md``, "Import forms"): ``from birder.model_registry import registry`` is the
registry object, ``Task`` the task enum, ``manifest`` the module of pretrained entries. Pretrained calls download
an entry served on 127.0.0.1; the full-size vit_l16 build runs in the slow suite.
"""

import hashlib
import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import TINY_VIT_CONFIG, LoopbackServer, make_tiny_vit
from PIL import Image

import birder
from birder.io.checkpoint import make_signature
from birder.model_registry.model_registry import ModelRegistry


def _from_import() -> ModelRegistry:
    from birder.model_registry import registry

    return registry


def _dotted() -> ModelRegistry:
    import birder.model_registry

    return birder.model_registry.registry


def _top_level() -> ModelRegistry:
    return birder.registry


SPELLINGS: dict[str, Callable[[], ModelRegistry]] = {
    "from birder.model_registry import registry": _from_import,
    "birder.model_registry.registry": _dotted,
    "birder.registry": _top_level,
}


@pytest.fixture(params=list(SPELLINGS), ids=["from-import", "dotted", "top-level"])
def registry(request: pytest.FixtureRequest) -> ModelRegistry:
    return SPELLINGS[request.param]()


def test_every_spelling_is_the_one_registry_object() -> None:
    objects = [get() for get in SPELLINGS.values()]
    assert all(isinstance(obj, ModelRegistry) for obj in objects)
    assert all(obj is objects[0] for obj in objects)


def test_registry_alone_knows_the_networks() -> None:
    """``from birder.model_registry import registry`` in a fresh interpreter, nothing else imported first."""
    import subprocess
    import sys

    code = "from birder.model_registry import registry; print(registry.exists('vit_l16'), len(registry.list_models()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "True"
    assert int(out[1]) > 500


def test_list_models_and_exists(registry: ModelRegistry) -> None:
    names = registry.list_models("vit_*")
    assert "vit_l16" in names and "vit_reg4_b16" in names
    assert all(name.startswith("vit_") for name in names)
    assert registry.exists("vit_l16")
    assert not registry.exists("vit_l17")


def test_net_factory_positional_form(registry: ModelRegistry) -> None:
    """``registry.net_factory("vit_l16", 707, size=(256, 256))``: built on the meta device (no memory) here."""
    with torch.device("meta"):
        net = registry.net_factory("vit_l16", 707, size=(256, 256))
    assert net.num_classes == 707
    assert net.size == (256, 256)
    assert net.pos_embedding.shape == (1, 1 + 16 * 16, 1024)
    assert sum(p.numel() for p in net.parameters()) == 304_087_747  # the card's 304.1 M

    small = registry.net_factory("vit_b16", 10, 1, config=TINY_VIT_CONFIG, size=(32, 32))  # input_channels third
    assert small(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.slow
def test_net_factory_full_size_vit_l16() -> None:
    for get in SPELLINGS.values():
        net = get().net_factory("vit_l16", 707, size=(256, 256)).eval()
        assert sum(p.numel() for p in net.parameters()) == 304_087_747
        with torch.inference_mode():
            assert net(torch.zeros(1, 3, 256, 256)).shape == (1, 707)
            assert net.embedding(torch.zeros(1, 3, 256, 256)).shape == (1, 1024)
        del net


def test_task_enum() -> None:
    import birder.model_registry
    from birder.model_registry import Task

    assert birder.model_registry.Task is Task
    assert [task.value for task in Task] == [
        "image_classification",
        "object_detection",
        "masked_image_modeling",
        "self_supervised_learning",
    ]
    assert Task.IMAGE_CLASSIFICATION == "image_classification"  # a StrEnum: compares equal to the file's string


def test_manifest_module() -> None:
    import birder.model_registry
    from birder.model_registry import manifest

    assert isinstance(manifest, ModuleType)
    assert birder.model_registry.manifest is manifest
    assert "vit_l16_mim-eu-common" in manifest.PRETRAINED_MODELS
    assert importlib.import_module("birder.model_registry.manifest") is manifest


def _publish_tiny_model(tmp_path: Path, server: LoopbackServer, name: str) -> dict:
    """A tiny classifier served at ``<url>/<name>.pt``, and its manifest entry (SPEC section 2 schema)."""
    net = make_tiny_vit(num_classes=3, size=(32, 48), seed=7)
    info = birder.ModelInfo(
        {"Parus major": 0, "Erithacus rubecula": 1, "Pica pica": 2},
        make_signature(3, net.size, 3),
        {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)},
    )
    path = birder.save_model(net, tmp_path / "published" / f"{name}.pt", info)
    server.add(f"/zoo/{name}.pt", path)
    return {
        "url": server.url("/zoo"),
        "description": "tiny test model",
        "resolution": (32, 48),
        "formats": {
            "pt": {"file_size": path.stat().st_size / 2**20, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        },
        "net": {"network": "vit_b16", "tag": "tiny"},
    }


@pytest.mark.usefixtures("restore_manifest")
def test_register_weights_then_load_pretrained(
    registry: ModelRegistry, tmp_path: Path, http_server: LoopbackServer
) -> None:
    entry = _publish_tiny_model(tmp_path, http_server, "tiny-island")
    registry.register_weights("tiny-island", entry)

    got = registry.get_pretrained_metadata("tiny-island")
    assert got["net"] == {"network": "vit_b16", "tag": "tiny"}
    assert got["task"] == "image_classification"  # derived when the entry does not say
    assert "tiny-island" in birder.list_pretrained_models()

    (net, model_info, transform) = birder.load_pretrained_model_and_transform("tiny-island", inference=True)
    assert not net.training
    assert list(model_info.class_to_idx) == ["Parus major", "Erithacus rubecula", "Pica pica"]
    photo = Image.new("RGB", (120, 80), (90, 140, 60))
    x = transform(photo)
    assert x.shape == (3, 32, 48)
    with torch.inference_mode():
        assert net(x.unsqueeze(0)).shape == (1, 3)
    assert http_server.requests["/zoo/tiny-island.pt"] == 1
