"""Both detection heads learn: a tiny ViT classifier is trained on the object classes first (about a minute), then
``birder-train-det`` trains each head on generated scenes from it, and held-out scenes score mAP@.5 >= 0.5 (by
pycocotools: the trainer's validation every epoch, and ``evaluate_detector_file`` on more scenes at the end).

The recipe (data, backbone, head configs, optimisation) is ``benchmarks.detection``'s, whose longer run reports the
curve, copy-paste included. Slow (run with ``-m slow``): on two idle AMD EPYC cores, with one compute thread (see
``one_compute_thread``), faster_rcnn takes 3 minutes (5 with the shared classifier it trains first) and retinanet
4.5 minutes.
"""

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.detection import HEAD_CONFIGS, TEST_SCALE, prepare_data, read_curve, train_det_args
from birder.net.detection.checkpoint import load_detector
from birder.scripts import train_det
from birder.training.detection_eval import evaluate_detector_file

# Faster R-CNN's softmax box head tells the shapes apart sooner than RetinaNet's sigmoid one.
EPOCHS = {"faster_rcnn": 20, "retinanet": TEST_SCALE.detector_epochs}


@pytest.fixture(scope="module", autouse=True)
def one_compute_thread() -> Iterator[None]:
    """Networks this small gain little from a second intra-op thread, and two threads on a busy two-core machine
    (other test runs) ran 4x slower than one: one thread computes, the other core is left to the rest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scenes_and_classifier(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("detection_learning")
    data = prepare_data(root, TEST_SCALE)
    print(f"classifier top-1 {data['classifier_top1']:.3f}, data and classifier in {data['seconds']:.0f} s")
    return {**data, "root": root}


@pytest.mark.slow
@pytest.mark.parametrize("head", sorted(HEAD_CONFIGS))
def test_detector_learns_from_a_classifier_backbone(head: str, scenes_and_classifier: dict[str, Any]) -> None:
    data = scenes_and_classifier
    output_dir: Path = data["root"] / head
    started = time.perf_counter()
    assert train_det.main(train_det_args(head, data, output_dir, EPOCHS[head])) == 0
    elapsed = time.perf_counter() - started

    curve = read_curve(output_dir / "det_metrics.csv")
    weights = output_dir / f"{head}_vit_t16_{EPOCHS[head]}.pt"
    held_out = evaluate_detector_file(weights, data["held_out"], workers=0, progress_bar=False)
    scenes = TEST_SCALE.held_out_scenes
    print(f"{head}: mAP@.5 by epoch {[round(row['map50'], 3) for row in curve]}, {elapsed:.0f} s")
    print(f"{head}: mAP@.5 {held_out.map50:.3f} on {scenes} held-out scenes")
    assert len(curve) == EPOCHS[head] and curve[-1]["map50"] >= 0.5
    assert held_out.map50 >= 0.5

    # The saved file scores the same on the validation scenes when evaluated on its own.
    assert load_detector(weights)[0].network_name == head
    result = evaluate_detector_file(weights, data["val"], workers=0, progress_bar=False)
    assert result.map50 == pytest.approx(curve[-1]["map50"], abs=1e-4)
