"""Masked-image-modelling networks. Importing this package registers them in :data:`mim_registry`."""

from birder.net.mim import mae_vit
from birder.net.mim.base import MIMRegistry, mim_registry
from birder.net.mim.mae_vit import MAE_ViT, MAEOutput, Reconstruction

__all__ = ["MAEOutput", "MAE_ViT", "MIMRegistry", "Reconstruction", "mae_vit", "mim_registry"]
