"""Detection networks. Importing this package registers them (task ``object_detection``)."""

from birder.net.detection import faster_rcnn, retinanet
from birder.net.detection.base import DetectionBaseNet, ViTDetBackbone
from birder.net.detection.faster_rcnn import FasterRCNN
from birder.net.detection.retinanet import RetinaNet

__all__ = ["DetectionBaseNet", "FasterRCNN", "RetinaNet", "ViTDetBackbone", "faster_rcnn", "retinanet"]
