"""Masked-image-modelling networks. Importing this package registers them (task ``masked_image_modeling``)."""

from birder.net.mim import mae_vit
from birder.net.mim.base import MIMBaseNet
from birder.net.mim.mae_vit import MAE_ViT, MAEOutput, Reconstruction

__all__ = ["MAEOutput", "MAE_ViT", "MIMBaseNet", "Reconstruction", "mae_vit"]
