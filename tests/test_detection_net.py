"""Detection networks: the ViTDet pyramid, both heads, the registry, detector files and single-photo inference."""

from pathlib import Path

import pytest
import torch
from conftest import TINY_VIT_CONFIG
from PIL import Image

import birder
from birder.data.transforms import RGB_STATS
from birder.errors import BirderError, CheckpointError
from birder.inference.detection import detect_tensors, detection_transform, infer_image, rescale_boxes
from birder.io.checkpoint import ModelInfo, make_signature
from birder.model_registry import Task, registry
from birder.net.detection.checkpoint import load_detector, save_detector
from birder.training.optim import param_groups

HEADS = ("faster_rcnn", "retinanet")
SMALL_HEAD = {"fpn_channels": 16, "anchor_sizes": [16, 32, 64, 128]}
HEAD_EXTRA = {"faster_rcnn": {"representation_size": 32}, "retinanet": {}}


def _backbone(seed: int = 0, size: tuple[int, int] = (64, 64), name: str = "vit_t16", num_classes: int = 0):
    torch.manual_seed(seed)
    return registry.net_factory(name, num_classes, config=TINY_VIT_CONFIG, size=size)


def _detector(head: str, seed: int = 0, size: tuple[int, int] = (96, 96), **config):
    backbone = _backbone(seed)
    torch.manual_seed(seed)
    return registry.detection_net_factory(
        head, 3, backbone, config={**SMALL_HEAD, **HEAD_EXTRA[head], **config}, size=size
    )


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0]]), "labels": torch.tensor([2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},  # a negative image
    ]


def test_registry_lists_detectors_under_their_task() -> None:
    assert set(HEADS) <= set(registry.list_models(task=Task.OBJECT_DETECTION))
    assert registry.network_task("retinanet") == "object_detection"
    with pytest.raises(BirderError, match="object_detection network, not image_classification"):
        registry.net_factory("faster_rcnn", 3)
    with pytest.raises(BirderError, match="unknown config key"):
        registry.detection_net_factory("retinanet", 3, _backbone(), config={"no_such_key": 1})


def test_pyramid_strides_at_any_input_size() -> None:
    det = _detector("faster_rcnn")
    body = det.detector.backbone
    for size in [(64, 64), (96, 160), (48, 80)]:
        levels = body(torch.randn(1, 3, *size))
        assert list(levels) == ["0", "1", "2", "3"]
        grid = size[0] // 16
        heights = [grid * 2, grid, grid // 2, -(-(grid // 2) // 2)]  # x2, x1, max-pooled, strided 1x1 pool
        assert [tuple(level.shape[1:3]) for level in levels.values()] == [(16, h) for h in heights]


def test_global_attention_pyramid_input_is_the_classifier_neck() -> None:
    det = _detector("retinanet")
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = det.vit.detection_features(x)["neck"]
        assert torch.allclose(det.detector.backbone.last_map(x), expected, atol=1e-6)


def test_windowed_attention_is_an_option_of_the_detector_only() -> None:
    det = _detector("retinanet", window_size=2, global_blocks=[1])
    x = torch.randn(1, 3, 80, 112)  # a 5 x 7 grid: windows are padded
    with torch.no_grad():
        windowed = det.detector.backbone.last_map(x)
        plain = det.vit.detection_features(x)["neck"]
    assert windowed.shape == plain.shape == (1, 32, 5, 7)
    assert not torch.allclose(windowed, plain)
    # The ViT itself is unchanged: a plain forward still gives its global-attention features.
    assert all(type(block.attn).__name__ == "Attention" for block in det.vit.encoder.block)


@pytest.mark.parametrize("head", HEADS)
def test_training_losses_and_eval_outputs(head: str) -> None:
    det = _detector(head)
    det.train()
    losses = det([torch.randn(3, 96, 96), torch.randn(3, 96, 96)], _targets())
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert det.vit.conv_proj.weight.grad is not None

    det.eval()
    with torch.no_grad():
        (output,) = det([torch.randn(3, 60, 150)])
    assert set(output) == {"boxes", "scores", "labels"}
    assert output["boxes"].shape[1] == 4
    if len(output["labels"]):
        assert int(output["labels"].min()) >= 0 and int(output["labels"].max()) < 3
        assert float(output["boxes"][:, 2].max()) <= 150.001 and float(output["boxes"][:, 3].max()) <= 60.001


def test_anchor_layout_and_head_options() -> None:
    det = _detector("retinanet", aspect_ratios=[1.0], scales_per_octave=2, head_norm_groups=0)
    anchors = det.detector.anchor_generator
    assert anchors.num_anchors_per_location() == [2] * 4  # two sizes, one ratio
    assert anchors.sizes[0] == (16, 22) and anchors.aspect_ratios[0] == (1.0,)
    assert not any(isinstance(module, torch.nn.GroupNorm) for module in det.detector.head.modules())
    rcnn = _detector("faster_rcnn", aspect_ratios=[0.5, 1.0])
    assert rcnn.detector.rpn.anchor_generator.num_anchors_per_location() == [2] * 4


def test_focal_loss_settings_follow_torchvision() -> None:
    images = [torch.randn(3, 96, 96), torch.randn(3, 96, 96)]
    paper = _detector("retinanet").train()
    assert type(paper.detector.head.classification_head).__name__ == "RetinaNetClassificationHead"
    same = _detector("retinanet", focal_alpha=0.25000001).train()  # the override, at the paper's values
    same.load_state_dict(paper.state_dict())
    assert type(same.detector.head.classification_head).__name__ == "FocalClassificationHead"
    (expected, got) = (paper(images, _targets()), same(images, _targets()))
    assert torch.allclose(expected["classification"], got["classification"], rtol=1e-5)
    milder = _detector("retinanet", focal_alpha=0.5, focal_gamma=1.0).train()
    milder.load_state_dict(paper.state_dict())  # the same parameters: only the loss differs
    assert not torch.allclose(milder(images, _targets())["classification"], expected["classification"])


def test_layer_decay_hooks_cover_backbone_and_head() -> None:
    det = _detector("faster_rcnn")
    assert det.num_layer_ids == TINY_VIT_CONFIG["num_layers"] + 2
    assert det.layer_id("detector.backbone.vit.conv_proj.weight") == 0
    assert det.layer_id("detector.backbone.vit.encoder.block.1.norm1.weight") == 2
    assert det.layer_id("detector.rpn.head.conv.0.0.weight") == det.num_layer_ids - 1
    groups = param_groups(det, 1e-3, 0.05, layer_decay=0.5)
    assert min(group["lr"] for group in groups) == pytest.approx(1e-3 * 0.5**3)
    assert "detector.backbone.vit.pos_embedding" in det.no_weight_decay()
    det.freeze_backbone()
    assert all(layer == det.num_layer_ids - 1 for layer in (g["layer"] for g in param_groups(det, 1e-3, 0.05, 0.5)))


def _info(det) -> ModelInfo:
    return ModelInfo({"a": 0, "b": 1, "c": 2}, make_signature(3, det.size, 3), RGB_STATS["birder"])


@pytest.mark.parametrize(("head", "suffix"), [("faster_rcnn", ".pt"), ("retinanet", ".safetensors")])
def test_save_load_round_trip(tmp_path: Path, head: str, suffix: str) -> None:
    det = _detector(head, window_size=2).eval()
    path = save_detector(det, tmp_path / f"det{suffix}", _info(det))
    (loaded, info) = load_detector(path, inference=True)
    assert type(loaded) is type(det) and loaded.network_name == head
    assert loaded.config["window_size"] == 2 and loaded.size == (96, 96) and loaded.num_classes == 3
    assert info.class_to_idx == {"a": 0, "b": 1, "c": 2} and list(info.rgb_stats["mean"]) == list(
        RGB_STATS["birder"]["mean"]
    )
    images = [torch.randn(3, 96, 96)]
    with torch.no_grad():
        (expected, got) = (det(images)[0], loaded(images)[0])
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(expected[key], got[key])


def test_a_classifier_file_refuses_to_load_as_a_detector(tmp_path: Path) -> None:
    net = _backbone(num_classes=3)
    path = birder.save_model(net, tmp_path / "cls.pt", ModelInfo({"a": 0, "b": 1, "c": 2}, {}, RGB_STATS["birder"]))
    with pytest.raises(CheckpointError, match="not a detector file"):
        load_detector(path)


def test_backbone_from_a_classifier_checkpoint(tmp_path: Path) -> None:
    classifier = _backbone(seed=3, size=(64, 64), num_classes=3)
    info = ModelInfo({"a": 0, "b": 1, "c": 2}, make_signature(3, (64, 64), 3), RGB_STATS["birder"])
    path = birder.save_model(classifier, tmp_path / "cls.pt", info)
    (loaded, _) = birder.load_model(path)
    det = registry.detection_net_factory("faster_rcnn", 2, loaded, config=SMALL_HEAD, size=(128, 128))
    vit_state = det.vit.state_dict()
    assert "classifier.weight" not in vit_state  # the classifier's head is dropped
    assert torch.equal(
        vit_state["encoder.block.1.mlp.0.weight"], classifier.state_dict()["encoder.block.1.mlp.0.weight"]
    )
    assert det.vit.pos_embedding.shape[1] == 1 + 8 * 8  # resized to the detector's 128 px


def test_infer_image_returns_boxes_in_photo_pixels() -> None:
    det = _detector("retinanet", score_thresh=0.0).eval()
    photo = Image.new("RGB", (600, 300), (120, 80, 40))
    transform = detection_transform(det.size, RGB_STATS["birder"])
    assert transform(photo).shape == (3, 48, 96)  # long side at most the network's 96
    result = infer_image(det, photo, transform)
    assert len(result.boxes) > 0
    assert result.boxes.shape[1] == 4 and result.scores.shape == result.labels.shape == (len(result.boxes),)
    assert float(result.boxes[:, 2].max()) > 96  # mapped back to the 600 px photo
    assert float(result.boxes[:, 2].max()) <= 600 and float(result.boxes[:, 3].max()) <= 300
    assert torch.all(result.scores[:-1] >= result.scores[1:])


def test_rescale_boxes() -> None:
    boxes = torch.tensor([[10.0, 5.0, 20.0, 15.0]])
    assert rescale_boxes(boxes, (50, 100), (100, 400)).tolist() == [[40.0, 10.0, 80.0, 30.0]]


@pytest.mark.parametrize(("name", "patch"), [("vit_reg4_t16_ls_pn", 16), ("vit_t14_avg", 14), ("vit_reg1_t32", 32)])
def test_any_vit_of_the_family_is_a_backbone(name: str, patch: int) -> None:
    torch.manual_seed(0)
    backbone = registry.net_factory(name, 0, config=TINY_VIT_CONFIG)  # built at 224 px, used at 4 x 6 patches
    size = (4 * patch, 6 * patch)
    det = registry.detection_net_factory("retinanet", 2, backbone, config=SMALL_HEAD, size=size).eval()
    assert det.patch_size == patch and det.vit.pos_embedding.shape[1] == det.vit.num_special_tokens + 4 * 6
    with torch.no_grad():
        levels = det.detector.backbone(torch.randn(1, 3, *size))
        assert levels["1"].shape[-2:] == (4, 6)
        assert det([torch.randn(3, 100, 70)])[0]["boxes"].shape[1] == 4  # any photo size


class _FixedDetector(torch.nn.Module):
    """A detector whose answer is given: one animal scored as two classes, and a second animal beside it."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        boxes = torch.tensor(
            [
                [10.0, 10.0, 50.0, 50.0],  # animal 1, class 0 (best)
                [12.0, 11.0, 51.0, 52.0],  # animal 1 again, class 1 (IoU ~0.9 with the first)
                [60.0, 10.0, 90.0, 40.0],  # animal 2, touching but separate (IoU 0)
                [40.0, 10.0, 80.0, 50.0],  # overlaps both by less than 0.5
            ]
        )
        answer = {"boxes": boxes, "scores": torch.tensor([0.9, 0.8, 0.7, 0.6]), "labels": torch.tensor([0, 1, 1, 0])}
        return [answer for _ in images]


def test_boxes_of_one_object_merge_across_classes() -> None:
    """A count must be a count: one animal the head scored as two classes is one box, keeping the best box's class
    and score; boxes overlapping by IoU <= 0.5 stay, and no two kept boxes overlap by more than 0.5."""
    from torchvision.ops import box_iou

    photo = torch.zeros(3, 100, 100)
    (found,) = detect_tensors(_FixedDetector(), [photo], [(100, 100)])
    assert found.labels.tolist() == [0, 1, 0]
    assert found.scores.tolist() == pytest.approx([0.9, 0.7, 0.6])
    iou = box_iou(found.boxes, found.boxes).fill_diagonal_(0)
    assert float(iou.max()) <= 0.5
    (every_box,) = detect_tensors(_FixedDetector(), [photo], [(100, 100)], merge_iou=None)
    assert len(every_box.boxes) == 4
