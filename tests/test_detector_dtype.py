"""A detector's backbone and feature pyramid in bfloat16, its box operations in float32: the same boxes and classes
as float32 (matched IoU >= 0.9), and float32 unchanged (bit for bit)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT_CONFIG
from detect_support import save_tiny_detector, tiny_detector
from torchvision.ops import box_iou

from birder.inference.detection import Detections, detect_tensors
from birder.inference.model import AS_LOADED, convert_dtype, load_for_inference
from birder.inference.optimize import DTYPE_ENV
from birder.model_registry import registry
from birder.net.detection.base import DetectionBaseNet


def seeded_faster_rcnn(seed: int = 0) -> DetectionBaseNet:
    """A seeded tiny Faster R-CNN whose class scores are spread out (random weights alone score every box about
    the same), so its best boxes are well apart from the rest."""
    torch.manual_seed(seed)
    body = registry.net_factory("vit_t16", 0, config=TINY_VIT_CONFIG, size=(128, 128))
    config = {"fpn_channels": 16, "representation_size": 32, "anchor_sizes": [16, 32, 64, 128]}
    det = registry.detection_net_factory("faster_rcnn", 3, body, config=config)
    with torch.no_grad():
        det.detector.roi_heads.box_predictor.cls_score.weight.mul_(20.0)
    return det.eval()


def photos(count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # Smooth, photo-like inputs (normalised): noise upsampled from a coarse grid
    return [
        F.interpolate(torch.randn(1, 3, 12, 16, generator=generator), size=(96, 128), mode="bilinear")[0]
        for _ in range(count)
    ]


def assert_same_detections(reference: Detections, candidate: Detections, top: int) -> None:
    """Each of ``reference``'s ``top`` best boxes is in ``candidate`` with its class, at IoU >= 0.9."""
    assert len(reference.boxes) >= 1 and candidate.boxes.dtype == torch.float32
    iou = box_iou(reference.boxes[:top], candidate.boxes)
    same_class = reference.labels[:top, None] == candidate.labels[None, :]
    best = torch.where(same_class, iou, torch.zeros_like(iou)).max(dim=1).values
    assert bool((best >= 0.9).all()), best


def test_bf16_backbone_finds_the_float32_boxes_faster_rcnn() -> None:
    inputs = photos(4, seed=1)
    sizes = [(960, 1280)] * len(inputs)
    reference = detect_tensors(seeded_faster_rcnn(), inputs, sizes, score_threshold=0.3)
    det = seeded_faster_rcnn().convert_backbone(torch.bfloat16)
    assert next(det.vit.parameters()).dtype == torch.bfloat16 and det.input_dtype == torch.float32
    assert det.detector.roi_heads.box_predictor.cls_score.weight.dtype == torch.float32
    found = detect_tensors(det, inputs, sizes, score_threshold=0.0)
    for expected, got in zip(reference, found, strict=True):
        assert_same_detections(expected, got, top=10)


def test_load_for_inference_runs_a_detector_file_in_bf16(tmp_path: Path) -> None:
    path = save_tiny_detector(tmp_path / "det.pt", classes=("bird", "mammal"))
    float32 = load_for_inference(weights=path, detector=True, device="cpu")
    bf16 = load_for_inference(weights=path, detector=True, device="cpu", dtype="bfloat16")

    assert float32.dtype == AS_LOADED and bf16.dtype.dtype == "bfloat16"
    assert next(bf16.net.vit.parameters()).dtype == torch.bfloat16
    assert all(param.dtype == torch.bfloat16 for param in bf16.net.detector.backbone.pyramid.parameters())
    assert all(param.dtype == torch.float32 for param in bf16.net.detector.head.parameters())
    inputs = photos(3, seed=2)
    sizes = [(480, 640)] * len(inputs)
    expected = detect_tensors(float32.net, inputs, sizes)
    got = detect_tensors(bf16.net, inputs, sizes)
    for reference, candidate in zip(expected, got, strict=True):
        assert len(candidate.boxes) == len(reference.boxes)
        assert_same_detections(reference, candidate, top=len(reference.boxes))


def test_float32_is_unchanged_bit_for_bit(tmp_path: Path) -> None:
    path = save_tiny_detector(tmp_path / "det.pt")
    loaded = load_for_inference(weights=path, detector=True, device="cpu")
    asked = load_for_inference(weights=path, detector=True, device="cpu", dtype="float32")
    inputs = photos(2, seed=3)
    sizes = [(96, 128)] * 2
    plain_found = detect_tensors(loaded.net, inputs, sizes)
    for plain, converted in zip(plain_found, detect_tensors(asked.net, inputs, sizes), strict=True):
        assert torch.equal(plain.boxes, converted.boxes) and torch.equal(plain.scores, converted.scores)

    # The backbone's maps are exactly the pyramid of its last map (the computation before any dtype handling)
    (det, _) = tiny_detector()
    body = det.detector.backbone
    batch = torch.stack(inputs)
    with torch.no_grad():
        maps = body(batch)
        last = body.last_map(batch)
        levels = [stage(last) for stage in body.pyramid]
    levels.append(F.max_pool2d(levels[-1], kernel_size=1, stride=2))
    assert [key for key in maps] == ["0", "1", "2", "3"]
    for got, expected in zip(maps.values(), levels, strict=True):
        assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_auto_chooses_bf16_only_where_the_cpu_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DTYPE_ENV, raising=False)
    (emulated, _) = tiny_detector()
    (_, choice) = convert_dtype(emulated, "auto", torch.device("cpu"), flags={"avx2", "avx512f"})
    assert choice.dtype == "float32" and next(emulated.vit.parameters()).dtype == torch.float32

    (native, _) = tiny_detector()
    (_, choice) = convert_dtype(native, "auto", torch.device("cpu"), flags={"avx2", "avx512_bf16"})
    assert choice.dtype == "bfloat16" and "avx512_bf16" in choice.reason
    assert next(native.vit.parameters()).dtype == torch.bfloat16 and native.input_dtype == torch.float32


def test_the_cpu_detects_a_few_photos_per_pass_with_the_same_boxes(monkeypatch: pytest.MonkeyPatch) -> None:
    # A loader batch of 32 12 MP photos must not pool every proposal of all 32 at once (GBs for the card-sized
    # detector): on the CPU a pass takes as many photos as keep the pooled features under the budget, and each
    # photo's boxes are those of one pass over the whole batch.
    import birder.inference.detection as D

    inputs = photos(7, seed=2)
    sizes = [(960, 1280)] * len(inputs)
    det = seeded_faster_rcnn()
    passes: list[int] = []
    det.register_forward_pre_hook(lambda module, args: passes.append(len(args[0])))
    whole = detect_tensors(det, inputs, sizes, score_threshold=0.3)
    assert passes == [7]  # 16 channels x 1000 proposals: 3 MB a photo, far under the budget
    passes.clear()
    monkeypatch.setattr(D, "CPU_POOLED_BYTES_PER_PASS", 3 * det.pooled_bytes_per_photo() + 1)
    chunked = detect_tensors(det, inputs, sizes, score_threshold=0.3)
    assert passes == [3, 3, 1]
    for expected, got in zip(whole, chunked, strict=True):
        assert torch.allclose(expected.boxes, got.boxes, atol=1e-3) and torch.equal(expected.labels, got.labels)
        assert torch.allclose(expected.scores, got.scores, atol=1e-5)


def test_photos_per_pass_bounds_the_card_sized_head_only_on_the_cpu() -> None:
    from birder.inference.detection import photos_per_pass

    body = registry.net_factory("vit_t16", 0, config=TINY_VIT_CONFIG, size=(128, 128))
    # The card-sized head (256 channels, 1000 proposals: 50 MB a photo): 5 photos a pass on the CPU
    card_head = registry.detection_net_factory("faster_rcnn", 1, body, config={"fpn_channels": 256})
    assert card_head.pooled_bytes_per_photo() == 1000 * 256 * 7 * 7 * 4
    assert photos_per_pass(card_head, torch.device("cpu")) == 5
    assert photos_per_pass(card_head, torch.device("cuda")) is None  # the whole batch
    # The fast pair's head (32 channels, 30 proposals): a loader batch of 32 in one pass
    body = registry.net_factory("vit_t16", 0, config=TINY_VIT_CONFIG, size=(128, 128))
    small_head = registry.detection_net_factory(
        "faster_rcnn", 1, body, config={"fpn_channels": 32, "rpn_post_nms_top_n_test": 30}
    )
    assert photos_per_pass(small_head, torch.device("cpu")) > 32
