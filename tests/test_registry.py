"""Model names and the pretrained manifest."""

import logging

import pytest

import birder
from birder.errors import BirderError, UnknownModelError
from birder.model_registry import registry


def test_card_model_manifest_entry() -> None:
    entry = registry.get_pretrained_metadata("vit_l16_mim-eu-common")
    assert entry["net"] == {"network": "vit_l16", "tag": "mim-eu-common"}
    assert entry["url"] == "https://huggingface.co/birder-project/vit_l16_mim-eu-common/resolve/main"
    assert entry["formats"]["pt"] == {
        "file_size": 1160.1,
        "sha256": "3b7235b90f76fb1e0e36d4c4111777a4cc4e4500552fe840c51170b208310d16",
    }
    assert tuple(entry["resolution"]) == (256, 256)
    assert entry["task"] == "image_classification"
    assert entry["description"] == "ViT L/16, MIM pretraining, then fine-tuned on eu-common"


def test_mim_encoders_listed() -> None:
    assert birder.list_pretrained_models("vit_l16_mim_*") == ["vit_l16_mim_200", "vit_l16_mim_400"]
    assert registry.get_pretrained_metadata("vit_l16_mim_400")["formats"]["pt"]["sha256"].startswith("9b5c4e25")


def test_unknown_network_suggests_close_names() -> None:
    with pytest.raises(UnknownModelError) as excinfo:
        registry.net_factory("vit_l61", 10)

    message = str(excinfo.value)
    assert "vit_l61" in message and "vit_l16" in message
    assert "\n" not in message


def test_unknown_pretrained_suggests_close_names() -> None:
    with pytest.raises(UnknownModelError, match="vit_l16_mim-eu-common"):
        birder.load_pretrained_model("vit_l16_mim-eu-comon")


def test_register_weights_replaces_with_warning(restore_manifest, caplog: pytest.LogCaptureFixture) -> None:
    entry = {
        "url": "http://127.0.0.1:1/mirror",
        "description": "a mirror",
        "resolution": (256, 256),
        "formats": {"pt": {"file_size": 1.0, "sha256": "ab" * 32}},
        "net": {"network": "vit_l16", "tag": "mim-eu-common"},
    }
    with caplog.at_level(logging.WARNING):
        registry.register_weights("vit_l16_mim-eu-common", entry)

    assert "replacing" in caplog.text
    stored = registry.get_pretrained_metadata("vit_l16_mim-eu-common")
    assert stored["url"] == "http://127.0.0.1:1/mirror"
    assert stored["task"] == "image_classification"  # derived when absent

    registry.register_weights("my-private-model", entry)
    assert "my-private-model" in birder.list_pretrained_models()


def test_register_weights_validates_schema(restore_manifest) -> None:
    with pytest.raises(BirderError, match="sha256"):
        registry.register_weights("broken", {"net": {"network": "vit_l16"}, "formats": {"pt": {"file_size": 1}}})


def test_list_models_filter() -> None:
    assert birder.list_models("vit_l16*") == sorted(birder.list_models("vit_l16*"))
    assert "vit_l16" in birder.list_models("vit_l16*")
    assert registry.exists("vit_l16") and not registry.exists("resnet_50")


def test_per_call_config_override_does_not_leak() -> None:
    small = registry.net_factory("vit_b16", 3, config={"hidden_dim": 64, "num_heads": 4, "num_layers": 1})
    assert small.hidden_dim == 64
    assert registry.network_config("vit_b16")["hidden_dim"] == 768
