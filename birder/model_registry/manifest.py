"""The pretrained models birder knows by name (data only; schema in docs/compatibility.md, "Pretrained manifest").

``file_size`` is in MiB, as in Birder's manifest. Files live at ``<url>/<name>.<format>``.
"""

from typing import Any

_VIT_L16_MIM_URL = "https://huggingface.co/birder-project/vit_l16_mim/resolve/main"


def _mim_encoder_entry(epochs: int, sha256: str) -> dict[str, Any]:
    """The MAE-pretrained vit_l16 encoders (no head, 224 px) that the card's model was fine-tuned from."""
    return {
        "url": _VIT_L16_MIM_URL,
        "description": f"ViT L/16 encoder, {epochs} epochs of masked image modelling (MAE), no classification head",
        "resolution": (224, 224),
        "formats": {"pt": {"file_size": 1157.1, "sha256": sha256}},
        "net": {"network": "vit_l16", "tag": "mim"},
        "task": "masked_image_modeling",
    }


PRETRAINED_MODELS: dict[str, dict[str, Any]] = {
    "vit_l16_mim-eu-common": {
        "url": "https://huggingface.co/birder-project/vit_l16_mim-eu-common/resolve/main",
        "description": "ViT L/16, MIM pretraining, then fine-tuned on eu-common",
        "resolution": (256, 256),
        "formats": {
            "pt": {
                "file_size": 1160.1,
                "sha256": "3b7235b90f76fb1e0e36d4c4111777a4cc4e4500552fe840c51170b208310d16",
            },
        },
        "net": {"network": "vit_l16", "tag": "mim-eu-common"},
        "task": "image_classification",
    },
    "vit_l16_mim_200": _mim_encoder_entry(200, "7fc5b342347d8349aaf5f069a47efd441b646f8542821ed2e30b47a7da72917a"),
    "vit_l16_mim_400": _mim_encoder_entry(400, "9b5c4e2538ea40edd60d8831d3807b543290dc2db44d537e60e44a341b47e54e"),
}
