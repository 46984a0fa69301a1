"""Gradient maps (Grad-CAM, HiResCAM, LayerCAM) on the last block's patch tokens, through the ``grad-cam`` package
(extra ``explain``).

All weigh the patch tokens' channels by the gradients of the chosen class and sum them over the channels, per token
(then keep the positive part). ``hirescam`` is the token-resolved form (HiResCAM, Draelos & Carin, 2020): each
token's channels are weighed by that token's own gradients. ``gradcam`` (classic Grad-CAM) first averages the
gradients over all tokens, one weight per channel; for a CNN ending in global average pooling the two are the same
map, but in a ViT the class token reads the patches through attention, so where it looked is in the per-token size
of the gradients, and the average washes it out. Measured on small ViTs trained on generated scenes (pointing game
on 100 validation scenes, never the test's held-out ones; 8 variants: class token or mean pooling, registers, 4 or 8
pixel patches, longer training, more data, 2 or 4 blocks): the averaged form put the map's maximum inside the object
for 0.25 to 0.74 of the scenes, at every block's input and output (but the last block's output of class-token
models: no gradient there); the token-resolved form at the last block's norm1 for 0.87 to 0.93 on the four class-
token models of 4 blocks without registers, 0.78 with 4 registers, 0.75 and 0.94 with mean pooling, and 0.36 on the
2-block model (which classified only 87 % of the scenes right). LayerCAM (Jiang et al., 2021) keeps only the
positive gradients; it points about as well (0.39 to 0.91 on the same models).

The target layer is the last block's first LayerNorm: the patch tokens as the last block reads them (as the
``grad-cam`` documentation advises for ViTs). For class-token networks the block's output patch tokens would have
no gradient (the head reads the class token, computed from the block's inputs). The package expects a
``[B, C, h, w]`` activation; a reshape turns the tokens into that grid (special tokens dropped).
"""

from collections.abc import Callable
from typing import Any

import torch

from birder.errors import BirderError
from birder.net.vit import ViT


def _import_grad_cam(method: str) -> tuple[Any, Any]:
    try:
        from pytorch_grad_cam import GradCAM, HiResCAM, LayerCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise BirderError("Grad-CAM needs the grad-cam package: pip install 'birder[explain]'") from None
    return ({"gradcam": GradCAM, "hirescam": HiResCAM, "layercam": LayerCAM}[method], ClassifierOutputTarget)


def token_grid_reshape(net: ViT, grid: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Tokens ``[B, special + h*w, D]`` -> ``[B, D, h, w]`` over the patch grid, in float32.

    The package applies this to the activations and to their gradients before it turns them into NumPy arrays,
    which have no bfloat16 (and float16 sums lose the map's small values): converting here runs the map's maths in
    float32 on a network that stays in its own dtype (no float32 copy of the weights).
    """

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, net.num_special_tokens :]
        return patches.reshape(tokens.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).float()

    return reshape


def grad_cam(net: ViT, inputs: torch.Tensor, targets: list[int], method: str = "gradcam") -> torch.Tensor:
    """Grad-CAM (or ``layercam``) maps ``[B, H, W]`` at the input resolution, each in [0, 1], for ``targets[i]``."""
    (CAM, ClassifierOutputTarget) = _import_grad_cam(method)
    (height, width) = inputs.shape[-2:]
    grid = (height // net.patch_size, width // net.patch_size)
    # Gradients reach the tokens through the input even when the weights are frozen (inference=True loading)
    inputs = inputs.detach().clone().requires_grad_(True)
    # The patch tokens as the last block reads them: for class-token networks its output patch tokens have no
    # gradient (the head reads the class token, computed from the block's inputs); for mean-pooled ones the same
    # layer pointed at the object more often than the output did (0.75 and 0.94 against 0.17 and 0.14)
    layer = net.encoder.block[-1].norm1
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        CAM(model=net, target_layers=[layer], reshape_transform=token_grid_reshape(net, grid)) as cam,
    ):
        maps = cam(input_tensor=inputs, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    return torch.from_numpy(maps).float()
