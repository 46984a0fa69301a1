"""Faster R-CNN (Ren et al. 2015) on the ViTDet pyramid: torchvision's RPN, RoIAlign and box head.

Config keys (on top of :attr:`DetectionBaseNet.common_config`):

- ``rpn_pre_nms_top_n_train`` / ``_test``, ``rpn_post_nms_top_n_train`` / ``_test``: proposals kept per image
  before and after the RPN's NMS (fewer: faster, enough for scenes with a handful of animals).
- ``rpn_batch_size_per_image``, ``box_batch_size_per_image``: anchors / proposals sampled per image for the losses.
- ``representation_size``: width of the two-layer box head.
- ``box_score_thresh``, ``box_nms_thresh``, ``box_detections_per_img``: the output filter.
"""

from collections.abc import Mapping
from typing import Any

from torch import nn
from torchvision.models.detection import FasterRCNN as TorchvisionFasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from birder.model_registry import registry
from birder.net.detection.base import DetectionBaseNet, ViTDetBackbone

ROI_SIZE = 7  # RoIAlign's output, per side: what the box head sees of each proposal


class FasterRCNN(DetectionBaseNet):
    default_config: Mapping[str, Any] = {
        "rpn_pre_nms_top_n_train": 2000,
        "rpn_pre_nms_top_n_test": 1000,
        "rpn_post_nms_top_n_train": 1000,
        "rpn_post_nms_top_n_test": 1000,
        "rpn_batch_size_per_image": 256,
        "box_batch_size_per_image": 512,
        "representation_size": 1024,
        "box_score_thresh": 0.05,
        "box_nms_thresh": 0.5,
        "box_detections_per_img": 100,
    }
    label_offset = 1

    def build_head(self, body: ViTDetBackbone) -> nn.Module:
        cfg = self.config
        anchors = self.anchor_generator()
        levels = [str(idx) for idx in range(len(cfg["anchor_sizes"]))]
        return TorchvisionFasterRCNN(
            body,
            num_classes=None,  # the predictor below sets it (our classes + the background)
            rpn_anchor_generator=anchors,
            box_roi_pool=MultiScaleRoIAlign(featmap_names=levels, output_size=ROI_SIZE, sampling_ratio=2),
            **{key: cfg[key] for key in self.default_config if key != "representation_size"},
            **self._box_head(body),
            **self.head_transform_kwargs(),
        )

    def pooled_bytes_per_photo(self) -> int:
        # Every proposal kept after the RPN's NMS, pooled to fpn_channels x 7 x 7 in the head's float32
        cfg = self.config
        return int(cfg["rpn_post_nms_top_n_test"]) * int(cfg["fpn_channels"]) * ROI_SIZE * ROI_SIZE * 4

    def _box_head(self, body: ViTDetBackbone) -> dict[str, Any]:
        # torchvision's TwoMLPHead and FastRCNNPredictor, at the configured width.
        width = self.config["representation_size"]
        return {
            "box_head": TwoMLPHead(body.out_channels * ROI_SIZE * ROI_SIZE, width),
            "box_predictor": FastRCNNPredictor(width, self.num_classes + 1),
        }


registry.register_model("faster_rcnn", FasterRCNN)
