"""RetinaNet (Lin et al. 2017) on the ViTDet pyramid: torchvision's head, focal loss, box coder and NMS.

Config keys (on top of :attr:`DetectionBaseNet.common_config`): ``score_thresh``, ``nms_thresh``,
``detections_per_img``, ``topk_candidates`` (per level, before NMS), ``fg_iou_thresh`` / ``bg_iou_thresh``
(anchor matching), ``head_norm_groups`` (GroupNorm in the head's towers, as torchvision's v2 RetinaNet;
0 for none), ``scales_per_octave`` (anchor sizes per level: 3 is the paper's 2^0, 2^(1/3), 2^(2/3)) and
``focal_alpha`` / ``focal_gamma`` (the classification loss: the paper's 0.25 and 2 by default; a short run on few
classes learns to tell them apart sooner with a weaker down-weighting, e.g. 0.5 and 1).
"""

import math
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import RetinaNet as TorchvisionRetinaNet
from torchvision.models.detection.retinanet import RetinaNetClassificationHead, RetinaNetHead
from torchvision.ops import sigmoid_focal_loss

from birder.model_registry import registry
from birder.net.detection.base import DetectionBaseNet, ViTDetBackbone


class FocalClassificationHead(RetinaNetClassificationHead):
    """torchvision's classification head with the focal loss's ``alpha`` and ``gamma`` chosen (torchvision fixes
    them at 0.25 and 2): the same targets, ignored anchors and per-image normalisation by the foreground count."""

    def __init__(self, *args: Any, alpha: float, gamma: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        (self.alpha, self.gamma) = (float(alpha), float(gamma))

    def compute_loss(
        self, targets: list[dict[str, torch.Tensor]], head_outputs: dict[str, torch.Tensor], matched_idxs: list
    ) -> torch.Tensor:
        losses = []
        for target, logits, matched in zip(targets, head_outputs["cls_logits"], matched_idxs, strict=True):
            foreground = matched >= 0
            classes = torch.zeros_like(logits)
            classes[foreground, target["labels"][matched[foreground]]] = 1.0
            valid = matched != self.BETWEEN_THRESHOLDS
            loss = sigmoid_focal_loss(
                logits[valid], classes[valid], alpha=self.alpha, gamma=self.gamma, reduction="sum"
            )
            losses.append(loss / max(1, int(foreground.sum())))

        return torch.stack(losses).sum() / len(targets)


class RetinaNet(DetectionBaseNet):
    default_config: Mapping[str, Any] = {
        "score_thresh": 0.05,
        "nms_thresh": 0.5,
        "detections_per_img": 100,
        "topk_candidates": 1000,
        "fg_iou_thresh": 0.5,
        "bg_iou_thresh": 0.4,
        "head_norm_groups": 16,
        "scales_per_octave": 3,
        "focal_alpha": 0.25,
        "focal_gamma": 2.0,
    }

    # Keys that shape the head rather than pass through to torchvision's RetinaNet.
    _layout_keys = frozenset({"head_norm_groups", "scales_per_octave", "focal_alpha", "focal_gamma"})

    def build_head(self, body: ViTDetBackbone) -> nn.Module:
        cfg = self.config
        steps = int(cfg["scales_per_octave"])
        anchors = self.anchor_generator(tuple(2 ** (step / steps) for step in range(steps)))
        # At least two channels per group: a 1 x 1 map (the coarsest level of a small input) would leave one value.
        groups = math.gcd(cfg["head_norm_groups"], body.out_channels // 2) if cfg["head_norm_groups"] else 0
        norm_layer = partial(nn.GroupNorm, groups) if groups else None
        num_anchors = anchors.num_anchors_per_location()[0]
        head = RetinaNetHead(body.out_channels, num_anchors, self.num_classes, norm_layer=norm_layer)
        if (cfg["focal_alpha"], cfg["focal_gamma"]) != (0.25, 2.0):
            head.classification_head = FocalClassificationHead(
                body.out_channels,
                num_anchors,
                self.num_classes,
                norm_layer=norm_layer,
                alpha=cfg["focal_alpha"],
                gamma=cfg["focal_gamma"],
            )
        return TorchvisionRetinaNet(
            body,
            num_classes=self.num_classes,
            anchor_generator=anchors,
            head=head,
            **{key: cfg[key] for key in self.default_config if key not in self._layout_keys},
            **self.head_transform_kwargs(),
        )


registry.register_model("retinanet", RetinaNet)
