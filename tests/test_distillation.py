"""Knowledge distillation (``birder-train --teacher ... --distill soft|hard``): the loss, the teacher, the cache."""

import csv
import logging
from pathlib import Path

import pytest
import torch
from test_training_classification import NEUTRAL, tiny_config
from test_training_data import make_split_dataset, single_thread  # noqa: F401 (autouse)

import birder
from birder.errors import BirderError
from birder.io.checkpoint import ModelInfo, make_signature
from birder.model_registry import registry
from birder.scripts import train as train_script
from birder.training.classification import train_classifier
from birder.training.distillation import DistillSettings, InputAdapter, soft_distillation_loss

TEACHER = {"hidden_dim": 48, "num_layers": 2, "num_heads": 4, "mlp_dim": 96, "patch_size": 8}


@pytest.fixture(scope="module")
def split_data(tmp_path_factory) -> Path:
    return make_split_dataset(tmp_path_factory.mktemp("birds"), train_per_class=8, val_per_class=4)


@pytest.fixture(scope="module")
def teacher(split_data: Path, tmp_path_factory) -> Path:
    """A trained (larger) teacher of the data's classes."""
    output = tmp_path_factory.mktemp("teacher")
    return train_classifier(tiny_config(split_data, output, model_config=TEACHER, epochs=2)).model_path


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory) -> Path:
    """An untrained teacher: its top-1 often differs from the labels, so hard distillation changes the loss."""
    torch.manual_seed(1)
    net = registry.net_factory("vit_b16", 4, config=TEACHER, size=(32, 32))
    info = ModelInfo({f"class_{k}": k for k in range(4)}, make_signature(3, (32, 32), 4), NEUTRAL)
    return birder.save_model(net, tmp_path_factory.mktemp("random_teacher") / "teacher.pt", info)


def _losses(metrics: Path) -> list[float]:
    with open(metrics, newline="") as handle:
        return [float(row["train_loss"]) for row in csv.DictReader(handle)]


def test_soft_loss_is_zero_for_the_teacher_itself_and_grows_with_disagreement() -> None:
    teacher = torch.tensor([[3.0, 1.0, -2.0], [0.0, 2.0, 1.0]])
    assert soft_distillation_loss(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    near = soft_distillation_loss(teacher + torch.tensor([0.3, 0.0, 0.0]), teacher, 2.0)
    far = soft_distillation_loss(teacher.flip(1), teacher, 2.0)
    assert 0 < near.item() < far.item()


def test_input_adapter_converts_to_the_teachers_normalisation() -> None:
    student = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    teacher = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    pixels = torch.rand(2, 3, 4, 4)
    as_student = (pixels - 0.5) / 0.25
    torch.testing.assert_close(InputAdapter(student, teacher)(as_student), pixels)
    assert InputAdapter(student, student)(as_student) is as_student


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_a_distilled_run_trains_and_differs_from_labels_alone(
    split_data: Path, random_teacher: Path, tmp_path: Path, kind: str
) -> None:
    plain = train_classifier(tiny_config(split_data, tmp_path / "plain", epochs=1))
    distilled = train_classifier(
        tiny_config(split_data, tmp_path / kind, epochs=1, teacher=random_teacher, distill=kind, distill_alpha=0.7)
    )
    assert distilled.model_path.is_file() and distilled.validation[1].top1 >= 0
    assert _losses(plain.metrics_path) != _losses(distilled.metrics_path)


def test_cached_teacher_logits_give_the_same_run(
    split_data: Path, teacher: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Deterministic inputs (no augmentation): the live teacher and its cached logits see the same images.
    common = {"epochs": 2, "aug_level": 0, "teacher": teacher, "distill": "soft"}
    live = train_classifier(tiny_config(split_data, tmp_path / "live", **common))
    cache = tmp_path / "teacher_logits.pt"
    first = train_classifier(tiny_config(split_data, tmp_path / "cached", teacher_cache=cache, **common))
    assert cache.is_file()
    assert _losses(first.metrics_path) == pytest.approx(_losses(live.metrics_path), rel=1e-4)

    with caplog.at_level(logging.INFO, logger="birder.training.distillation"):
        again = train_classifier(tiny_config(split_data, tmp_path / "again", teacher_cache=cache, **common))
    assert f"teacher logits from {cache}" in caplog.text
    assert _losses(again.metrics_path) == _losses(first.metrics_path)


def test_cache_refused_with_random_inputs(split_data: Path, teacher: Path, tmp_path: Path) -> None:
    cache = tmp_path / "logits.pt"
    for random_inputs in ({"aug_level": 1}, {"aug_level": 0, "mixup_alpha": 0.8}):
        config = tiny_config(split_data, tmp_path / "run", teacher=teacher, teacher_cache=cache, **random_inputs)
        with pytest.raises(BirderError, match="--aug-level 0"):
            train_classifier(config)
    assert not cache.exists()


def test_distillation_needs_a_teacher_of_the_same_classes(split_data: Path, teacher: Path, tmp_path: Path) -> None:
    with pytest.raises(BirderError, match="--teacher"):
        train_classifier(tiny_config(split_data, tmp_path / "a", distill="soft"))
    other = make_split_dataset(tmp_path / "other", train_per_class=2, val_per_class=1, classes=3)
    with pytest.raises(BirderError, match="classes differ"):
        train_classifier(tiny_config(other, tmp_path / "b", teacher=teacher))
    with pytest.raises(BirderError, match="distillation"):
        DistillSettings(teacher, kind="warm").check(random_inputs=False)


def test_command_line(split_data: Path, teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["--data-dir", str(split_data), "--network", "vit_b16", "--model-config", '{"hidden_dim": 32, '
            '"num_layers": 1, "num_heads": 4, "mlp_dim": 64, "patch_size": 8}', "--size", "32", "--epochs", "1",
            "--batch-size", "8", "--workers", "0", "--no-progress", "--rgb-stats", "neutral"]  # fmt: skip
    assert train_script.main([*base, "--output-dir", str(tmp_path / "ok"), "--teacher", str(teacher), "--distill",
                              "hard", "--distill-alpha", "0.5"]) == 0  # fmt: skip
    assert (tmp_path / "ok" / "vit_b16_1.pt").is_file()

    code = train_script.main([*base, "--output-dir", str(tmp_path / "bad"), "--teacher", str(teacher),
                              "--teacher-cache", str(tmp_path / "c.pt")])  # fmt: skip
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and error.startswith("birder-train: error: --teacher-cache needs") and "--aug-level 0" in error
