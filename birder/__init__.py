"""birder: wildlife photo classification with Vision Transformers.

The model card's code runs as written::

    import birder
    from birder.inference.classification import infer_image

    (net, model_info) = birder.load_pretrained_model("vit_l16_mim-eu-common", inference=True)
    size = birder.get_size_from_signature(model_info.signature)
    transform = birder.classification_transform(size, model_info.rgb_stats)
    (out, _) = infer_image(net, "path/to/image.jpeg", transform)
"""

from birder.data.transforms import classification_transform
from birder.io.checkpoint import ModelInfo, get_channels_from_signature, get_size_from_signature
from birder.loading import load_model, load_pretrained_model, load_pretrained_model_and_transform, save_model
from birder.model_registry import registry
from birder.version import __version__

list_models = registry.list_models
list_pretrained_models = registry.list_pretrained_models

__all__ = [
    "ModelInfo",
    "__version__",
    "classification_transform",
    "get_channels_from_signature",
    "get_size_from_signature",
    "list_models",
    "list_pretrained_models",
    "load_model",
    "load_pretrained_model",
    "load_pretrained_model_and_transform",
    "registry",
    "save_model",
]
