"""Networks. Importing this package registers every family's named configs."""

from birder.net import mim, vit
from birder.net.base import BaseNet
from birder.net.vit import ViT

__all__ = ["BaseNet", "ViT", "mim", "vit"]
