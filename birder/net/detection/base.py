"""The contract of detection networks, and the ViTDet backbone they all share.

A detector wraps a backbone (a registered classification network, a ViT of any size, patch or input size) in
a simple feature pyramid (ViTDet, Li et al. 2022): the backbone's last map (stride = patch size, 16 for most
names) is up-sampled x2, kept, and down-sampled x2 and x4, so the head sees strides 8, 16, 32 and 64. Heads are
torchvision's detection components (anchors, RPN, RoI heads, RetinaNet, box coders, NMS), not re-written.

Detectors register in the one registry with ``task=object_detection`` and are built with
``registry.detection_net_factory(name, num_classes, backbone, config=..., size=...)``. Labels are ``0..K-1``
(the order of the checkpoint's ``class_to_idx``) both in training targets and in outputs, whatever the head
reserves internally (Faster R-CNN's background class).

Inputs are normalised image tensors ``[C, H, W]`` of any size (:func:`birder.inference.detection.detection_transform`);
the head's torchvision transform resizes them so the long side is ``size`` and maps boxes back to each input's
own pixels.
"""

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.convnext import LayerNorm2d
from torchvision.models.detection.anchor_utils import AnchorGenerator

from birder.errors import BirderError
from birder.net.base import BaseNet, ConfigOverride, InputSize, resolve_config
from birder.tasks import Task

Targets = list[dict[str, torch.Tensor]]


def _even_global_blocks(num_layers: int, count: int = 4) -> list[int]:
    """ViTDet's choice: ``count`` evenly spaced blocks keep global attention (the last of each quarter)."""
    step = max(num_layers // count, 1)
    return sorted({min(step * (i + 1) - 1, num_layers - 1) for i in range(count)})


def _windowed(block: nn.Module, tokens: torch.Tensor, grid: tuple[int, int], window: int) -> torch.Tensor:
    """Run ``block`` on non-overlapping ``window`` x ``window`` windows of the patch grid (zero-padded to fit).

    Norms and MLP act per token, so running the whole block per window equals windowing its attention alone.
    """
    (batch, _, dim) = tokens.shape
    (height, width) = grid
    x = tokens.reshape(batch, height, width, dim)
    (pad_h, pad_w) = ((-height) % window, (-width) % window)
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    (rows, cols) = ((height + pad_h) // window, (width + pad_w) // window)
    x = x.reshape(batch, rows, window, cols, window, dim).permute(0, 1, 3, 2, 4, 5)
    x = block(x.reshape(batch * rows * cols, window * window, dim))
    x = x.reshape(batch, rows, cols, window, window, dim).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(batch, rows * window, cols * window, dim)[:, :height, :width]
    return x.reshape(batch, height * width, dim)


def _projection(in_channels: int, out_channels: int) -> list[nn.Module]:
    """ViTDet's per-level output convolutions: 1x1 to the pyramid width, then 3x3, each LayerNorm-ed."""
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
        LayerNorm2d(out_channels),
        nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(out_channels),
    ]


class ViTDetBackbone(nn.Module):
    """A ViT and its simple feature pyramid: ``{"0": stride p/2, "1": p, "2": 2p, "3": 4p}`` maps of
    ``out_channels`` (``p`` the patch size; 8, 16, 32, 64 for ``*16`` names).

    ``window_size`` > 0 runs the blocks not in ``global_blocks`` with windowed attention (ViTDet's option for
    large inputs); the special tokens are then dropped after the position embedding, as ViTDet does. With
    ``window_size`` 0 the last map equals ``vit.detection_features(x)["neck"]``. The ViT itself is untouched:
    windowing is how this module runs its blocks, not a change to them.
    """

    def __init__(
        self, vit: BaseNet, out_channels: int, *, window_size: int = 0, global_blocks: list[int] | None = None
    ) -> None:
        super().__init__()
        if not hasattr(vit, "encoder") or not hasattr(vit, "patch_size"):
            raise BirderError(f"detection backbones are ViTs; got {type(vit).__name__}")

        self.vit = vit
        self.out_channels = out_channels
        self.window_size = int(window_size)
        num_layers = len(vit.encoder.block)
        chosen = global_blocks if global_blocks is not None else _even_global_blocks(num_layers)
        self.global_blocks = {idx % num_layers for idx in chosen}
        dim = vit.hidden_dim
        self.pyramid = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2), *_projection(dim // 2, out_channels)
                ),
                nn.Sequential(*_projection(dim, out_channels)),
                nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=2), *_projection(dim, out_channels)),
            ]
        )

    def last_map(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's final-norm patch map ``[B, D, H/p, W/p]`` (windowed blocks as configured)."""
        vit = self.vit
        (tokens, grid) = vit._tokens(x)
        tokens = vit.encoder.pre_block(tokens)
        special = vit.num_special_tokens
        if self.window_size > 0:
            (tokens, special) = (tokens[:, special:], 0)

        for idx, block in enumerate(vit.encoder.block):
            if self.window_size > 0 and idx not in self.global_blocks:
                tokens = _windowed(block, tokens, grid, self.window_size)
            else:
                tokens = block(tokens)

        patches = vit.norm(tokens)[:, special:]
        return patches.transpose(1, 2).reshape(x.shape[0], vit.hidden_dim, grid[0], grid[1])

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        # The backbone may run in another dtype than the head (bfloat16 behind float32 box operations,
        # DetectionBaseNet.convert_backbone): the batch comes in and the maps go out in the head's dtype. In one
        # dtype both casts are no-ops (the same tensors).
        feature = self.last_map(x.to(next(self.vit.parameters()).dtype))
        levels = [stage(feature) for stage in self.pyramid]
        # The coarsest level, as ViTDet and torchvision's LastLevelMaxPool make it: a strided 1x1 max pool.
        levels.append(F.max_pool2d(levels[-1], kernel_size=1, stride=2))
        return OrderedDict((str(idx), level.to(x.dtype)) for idx, level in enumerate(levels))


class DetectionBaseNet(nn.Module):
    """Base class of detectors: a :class:`ViTDetBackbone` and a torchvision head in ``self.detector``.

    ``forward(images, targets)`` returns the head's loss dict in training mode and, in eval mode, one dict per
    image (``boxes`` ``[N, 4]`` xyxy in that image's pixels, ``scores``, ``labels`` in ``0..K-1``). Subclasses set
    ``default_config`` (their own keys on top of :attr:`common_config`) and implement :meth:`build_head`.
    """

    task: str = Task.OBJECT_DETECTION.value
    # Keys every detector takes; subclasses add their head's.
    common_config: Mapping[str, Any] = {
        "fpn_channels": 256,
        "window_size": 0,  # 0: global attention in every block (windowed attention is off)
        "global_blocks": None,  # with window_size: blocks kept global (None: four evenly spaced, as ViTDet)
        "anchor_sizes": [32, 64, 128, 256],  # one per pyramid level (strides 8..64 for patch 16)
        "aspect_ratios": [0.5, 1.0, 2.0],  # height / width of the anchors, at every level
    }
    default_config: Mapping[str, Any] = {}
    # Faster R-CNN reserves label 0 for the background: its labels are ours + 1.
    label_offset = 0

    def __init__(self, num_classes: int, backbone: BaseNet, *, config: ConfigOverride = None, size: InputSize = None):
        super().__init__()
        if num_classes < 1:
            raise BirderError(f"a detector needs at least one class, got {num_classes}")

        self.config = resolve_config(type(self).__name__, {**self.common_config, **self.default_config}, config)
        self.num_classes = num_classes
        self.input_channels = backbone.input_channels
        self.size = tuple(int(v) for v in (size if size is not None else backbone.size))
        # The classifier's head is not used (and DDP refuses parameters without gradients): drop it.
        backbone.reset_classifier(0)
        backbone.adjust_size(self.size)
        cfg = self.config
        self.backbone_name: str | None = backbone.network_name
        self.backbone_config: dict[str, Any] | None = backbone.config_override
        body = ViTDetBackbone(
            backbone, cfg["fpn_channels"], window_size=cfg["window_size"], global_blocks=cfg["global_blocks"]
        )
        self.patch_size: int = body.vit.patch_size
        if len(cfg["anchor_sizes"]) != 4:
            raise BirderError(f"anchor_sizes needs one size per pyramid level (4), got {cfg['anchor_sizes']}")

        self.detector = self.build_head(body)
        # Set by the registry, written into checkpoints (as for classifiers).
        self.network_name: str | None = None
        self.config_override: dict[str, Any] | None = None

    def head_transform_kwargs(self) -> dict[str, Any]:
        """torchvision's resize-and-batch step: long side to ``size``, padded to the patch grid; normalisation is
        the input transform's (rgb stats), so none here."""
        return {
            "min_size": min(self.size),
            "max_size": max(self.size),
            "image_mean": [0.0] * self.input_channels,
            "image_std": [1.0] * self.input_channels,
            "size_divisible": self.patch_size,
        }

    def build_head(self, body: ViTDetBackbone) -> nn.Module:
        raise NotImplementedError

    def anchor_generator(self, scales: tuple[float, ...] = (1.0,)) -> AnchorGenerator:
        """torchvision's anchors: at each level its ``anchor_sizes`` entry times each of ``scales``, in every one of
        the ``aspect_ratios``."""
        cfg = self.config
        ratios = tuple(float(ratio) for ratio in cfg["aspect_ratios"])
        return AnchorGenerator(
            sizes=tuple(tuple(int(size * scale) for scale in scales) for size in cfg["anchor_sizes"]),
            aspect_ratios=(ratios,) * len(cfg["anchor_sizes"]),
        )

    @property
    def vit(self) -> BaseNet:
        return self.detector.backbone.vit

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype of the inputs and of the box operations (anchors, proposals, RoIAlign, NMS, box decoding): the
        head's. The backbone runs in its own (:meth:`convert_backbone`) behind casts at its boundary."""
        head = (param for name, param in self.named_parameters() if not name.startswith("detector.backbone."))
        return next(head).dtype

    def convert_backbone(self, dtype: torch.dtype) -> "DetectionBaseNet":
        """Run the ViT and its feature pyramid in ``dtype`` (bfloat16 where the CPU or GPU has native bf16
        matmuls); the head, and torchvision's box operations with it, stay as they are (float32). Returns self."""
        self.detector.backbone.to(dtype)
        return self

    def pooled_bytes_per_photo(self) -> int:
        """Bytes of features the head pools per photo in inference (RoI pooling of every proposal); 0 for a head
        that pools none. Inference bounds the photos of one CPU pass by it."""
        return 0

    def forward(self, images: list[torch.Tensor], targets: Targets | None = None) -> Any:
        if self.training:
            if targets is None:
                raise BirderError("a detector in training mode needs targets")
            shifted = [{**target, "labels": target["labels"] + self.label_offset} for target in targets]
            return self.detector(list(images), shifted)

        outputs = self.detector(list(images))
        return [{**output, "labels": output["labels"] - self.label_offset} for output in outputs]

    # Training hooks (as for classifiers: the optimizer helpers know no parameter names)

    def no_weight_decay(self) -> set[str]:
        return {f"detector.backbone.vit.{name}" for name in self.vit.no_weight_decay()}

    @property
    def num_layer_ids(self) -> int:
        return self.vit.num_layer_ids

    def layer_id(self, param_name: str) -> int:
        """The backbone's own layer ids; the pyramid and head train at the full rate (the last layer)."""
        prefix = "detector.backbone.vit."
        if param_name.startswith(prefix):
            return self.vit.layer_id(param_name[len(prefix) :])

        return self.num_layer_ids - 1

    def set_drop_path_rate(self, rate: float) -> None:
        self.vit.set_drop_path_rate(rate)

    def freeze_backbone(self) -> None:
        """Train the pyramid and head only (the ViT keeps its classifier or MIM features)."""
        self.vit.requires_grad_(False)

    def upgrade_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state_dict
