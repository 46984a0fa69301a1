"""Resume equals uninterrupted: the same weights, the same metrics files, every batch exactly once.

Two epochs straight are compared with one epoch, a stop, a resume and the second epoch (and with a crash in the
middle of an epoch, resumed from a step checkpoint). The classifier run uses every stateful part at once: EMA,
mixup/cutmix (random per batch), random augmentation, gradient accumulation, warm-up, layer decay, class-balanced
sampling.
"""

import shutil
from pathlib import Path

import pytest
import torch
from test_training_classification import tiny_config
from test_training_data import make_image_folder, make_split_dataset, single_thread  # noqa: F401 (autouse)
from test_training_mim import tiny_config as tiny_mim_config

from birder.errors import CheckpointError
from birder.training.classification import TrainConfig, train_classifier
from birder.training.loop import BatchEvent
from birder.training.mim import train_mim
from birder.training.state import load_training_state


class Interrupt(Exception):
    pass


def recorder(events: list[tuple], stop_at: tuple[int, int] | None = None):
    """Collects (epoch, batch, step, sample indices); raises after batch ``stop_at = (epoch, batch)``."""

    def on_batch(event: BatchEvent) -> None:
        events.append((event.epoch, event.batch, event.step, tuple(event.indices)))
        if stop_at == (event.epoch, event.batch):
            raise Interrupt

    return on_batch


# On top of the small supervised run: every stateful part at once, and a checkpoint every epoch.
RESUME_RECIPE = {
    "epochs": 2,
    "accumulation_steps": 2,
    "warmup_epochs": 1,
    "layer_decay": 0.8,
    "label_smoothing": 0.1,
    "mixup_alpha": 0.8,
    "cutmix_alpha": 1.0,
    "ema_decay": 0.9,
    "class_balanced": True,
    "aug_level": 3,
    "clip_grad_norm": 1.0,
    "save_every": 1,
}


def classifier_config(data: Path, output: Path, **overrides) -> TrainConfig:
    return tiny_config(data, output, **{**RESUME_RECIPE, **overrides})


def assert_same_states(a: Path, b: Path) -> None:
    (first, second) = (load_training_state(a), load_training_state(b))
    for part in ("model", "ema"):
        if first[part] is None:
            continue
        weights = first[part]["module"] if part == "ema" else first[part]
        other = second[part]["module"] if part == "ema" else second[part]
        for key, value in weights.items():
            torch.testing.assert_close(other[key], value, rtol=0, atol=1e-6, msg=f"{part} {key}")
    for group_a, group_b in zip(first["optimizer"]["param_groups"], second["optimizer"]["param_groups"], strict=True):
        assert group_a["lr"] == group_b["lr"]
    for index, values in first["optimizer"]["state"].items():
        for name, value in values.items():
            torch.testing.assert_close(second["optimizer"]["state"][index][name], value, rtol=0, atol=1e-6)
    assert first["global_step"] == second["global_step"] and first["scheduler"] == second["scheduler"]


def assert_same_files(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        assert (a / name).read_text() == (b / name).read_text(), name


@pytest.fixture(scope="module")
def split_data(tmp_path_factory) -> Path:
    # 7 images per class: 28 per epoch, so the last batch is short and the last accumulation group too.
    return make_split_dataset(tmp_path_factory.mktemp("birds"), train_per_class=7, val_per_class=3)


@pytest.fixture(scope="module")
def straight_run(split_data: Path, tmp_path_factory) -> tuple[Path, list[tuple]]:
    output = tmp_path_factory.mktemp("straight")
    events: list[tuple] = []
    train_classifier(classifier_config(split_data, output), on_batch=recorder(events))
    return (output, events)


def test_stop_and_resume_between_epochs(split_data: Path, straight_run, tmp_path: Path) -> None:
    (straight, straight_events) = straight_run
    events: list[tuple] = []
    train_classifier(classifier_config(split_data, tmp_path, stop_epoch=1), on_batch=recorder(events))
    assert not (tmp_path / "vit_b16_2.pt").exists()
    train_classifier(classifier_config(split_data, tmp_path, resume=tmp_path / "vit_b16_1_states.pt"),
                     on_batch=recorder(events))  # fmt: skip

    assert events == straight_events  # every batch once, same samples, same order, same step numbers
    assert_same_states(straight / "vit_b16_2_states.pt", tmp_path / "vit_b16_2_states.pt")
    assert_same_files(straight, tmp_path, ["metrics.csv", "per_class_metrics.csv", "confusion_matrix.csv"])


def test_crash_mid_epoch_resumes_from_the_step_checkpoint(split_data: Path, straight_run, tmp_path: Path) -> None:
    (straight, straight_events) = straight_run
    # 4 batches per epoch, a step every 2: step 3 ends batch 2 of epoch 2; the crash comes after batch 3.
    events: list[tuple] = []
    config = classifier_config(split_data, tmp_path, save_every_steps=3)
    with pytest.raises(Interrupt):
        train_classifier(config, on_batch=recorder(events, stop_at=(2, 3)))
    assert events[-1][:2] == (2, 3)
    events.pop()  # batch 3 of epoch 2 was never stepped: the resumed run does it again

    config.resume = "latest"
    train_classifier(config, on_batch=recorder(events))
    assert events == straight_events
    assert_same_states(straight / "vit_b16_2_states.pt", tmp_path / "vit_b16_2_states.pt")
    assert_same_files(straight, tmp_path, ["metrics.csv", "per_class_metrics.csv"])


def test_resume_refuses_another_runs_state(split_data: Path, straight_run, tmp_path: Path) -> None:
    (straight, _) = straight_run
    make_image_folder(tmp_path / "other" / "train", 2, classes=2)
    make_image_folder(tmp_path / "other" / "val", 1, classes=2)
    shutil.copy(straight / "vit_b16_1_states.pt", tmp_path / "x_states.pt")
    config = classifier_config(tmp_path / "other", tmp_path / "run", resume=tmp_path / "x_states.pt")
    with pytest.raises(CheckpointError, match="another run"):
        train_classifier(config)


def test_mim_resume_equals_uninterrupted(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "photos", 5)
    straight_events: list[tuple] = []
    train_mim(tiny_mim_config(data, tmp_path / "a", epochs=2, save_every=1, visualize=2, accumulation_steps=2),
              on_batch=recorder(straight_events))  # fmt: skip

    events: list[tuple] = []
    config = tiny_mim_config(data, tmp_path / "b", epochs=2, save_every=1, visualize=2, accumulation_steps=2)
    config.save_every_steps = 1
    with pytest.raises(Interrupt):
        # 3 batches per epoch, a step every 2: batch 2 of epoch 2 ends step 3, saved in the step checkpoint.
        train_mim(config, on_batch=recorder(events, stop_at=(2, 2)))
    assert load_training_state(tmp_path / "b" / "mae_vit_vit_b16_step_states.pt")["progress"]["batches"] == 2
    config.resume = "latest"
    train_mim(config, on_batch=recorder(events))

    assert events == straight_events
    assert_same_states(tmp_path / "a" / "mae_vit_vit_b16_2_states.pt", tmp_path / "b" / "mae_vit_vit_b16_2_states.pt")
    assert_same_files(tmp_path / "a", tmp_path / "b", ["mim_metrics.csv"])
    for name in ("mim_reconstruction_2.png", "vit_b16_mim_2.pt"):
        assert (tmp_path / "a" / name).is_file() and (tmp_path / "b" / name).is_file()


def test_loader_workers_do_not_change_the_run(split_data: Path, straight_run, tmp_path: Path) -> None:
    # Augmentation is seeded per sample and epoch, not per worker: 2 loader processes give the same run as none.
    (straight, straight_events) = straight_run
    events: list[tuple] = []
    train_classifier(classifier_config(split_data, tmp_path, workers=2), on_batch=recorder(events))
    assert events == straight_events
    assert_same_states(straight / "vit_b16_2_states.pt", tmp_path / "vit_b16_2_states.pt")
