"""RetinaNet (Lin et al. 2017) on the ViTDet pyramid: torchvision's head, focal loss, box coder and NMS.

Config keys (on top of :attr:`DetectionBaseNet.common_config`): ``score_thresh``, ``nms_thresh``,
``detections_per_img``, ``topk_candidates`` (per level, before NMS), ``fg_iou_thresh`` / ``bg_iou_thresh``
(anchor matching) and ``head_norm_groups`` (GroupNorm in the head's towers, as torchvision's v2 RetinaNet;
0 for none).
"""

import math
from collections.abc import Mapping
from functools import partial
from typing import Any

from torch import nn
from torchvision.models.detection import RetinaNet as TorchvisionRetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead

from birder.model_registry import registry
from birder.net.detection.base import DetectionBaseNet, ViTDetBackbone

ASPECT_RATIOS = (0.5, 1.0, 2.0)
# Three scales per level an octave apart in thirds, as the paper.
OCTAVE_SCALES = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))


class RetinaNet(DetectionBaseNet):
    default_config: Mapping[str, Any] = {
        "score_thresh": 0.05,
        "nms_thresh": 0.5,
        "detections_per_img": 100,
        "topk_candidates": 1000,
        "fg_iou_thresh": 0.5,
        "bg_iou_thresh": 0.4,
        "head_norm_groups": 16,
    }

    def build_head(self, body: ViTDetBackbone) -> nn.Module:
        cfg = self.config
        anchors = AnchorGenerator(
            sizes=tuple(tuple(int(size * scale) for scale in OCTAVE_SCALES) for size in cfg["anchor_sizes"]),
            aspect_ratios=(ASPECT_RATIOS,) * len(cfg["anchor_sizes"]),
        )
        # At least two channels per group: a 1 x 1 map (the coarsest level of a small input) would leave one value.
        groups = math.gcd(cfg["head_norm_groups"], body.out_channels // 2)
        norm_layer = partial(nn.GroupNorm, groups) if groups else None
        head = RetinaNetHead(
            body.out_channels, anchors.num_anchors_per_location()[0], self.num_classes, norm_layer=norm_layer
        )
        return TorchvisionRetinaNet(
            body,
            num_classes=self.num_classes,
            anchor_generator=anchors,
            head=head,
            **{key: cfg[key] for key in self.default_config if key != "head_norm_groups"},
            **self.head_transform_kwargs(),
        )


registry.register_model("retinanet", RetinaNet)
