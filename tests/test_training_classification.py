"""Supervised training (``train_classifier`` / ``birder-train``) and evaluation (``birder-eval``)."""

import csv
import logging
from pathlib import Path

import pytest
import torch
from conftest import TINY_VIT_CONFIG
from test_training_data import make_image_folder, make_split_dataset, single_thread  # noqa: F401 (autouse)

import birder
from birder.io.checkpoint import make_signature
from birder.model_registry import registry
from birder.scripts import evaluate as evaluate_script
from birder.scripts import train as train_script
from birder.training.classification import TrainConfig, train_classifier
from birder.training.evaluation import evaluate_checkpoint
from birder.training.state import load_training_state

TINY = {**TINY_VIT_CONFIG, "patch_size": 8}
NEUTRAL = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def read_rows(path: Path, *, header: bool = True) -> list:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle) if header else csv.reader(handle))


def tiny_config(data: Path, output: Path, **overrides) -> TrainConfig:
    settings = {
        "output_dir": output,
        "data_dir": data,
        "network": "vit_b16",
        "model_config": TINY,
        "size": 32,
        "rgb_stats": "neutral",
        "epochs": 3,
        "batch_size": 8,
        "lr": 2e-3,
        "workers": 0,
        "save_every": 10,
        "aug_level": 1,
        "progress_bar": False,
        **overrides,
    }
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def split_data(tmp_path_factory) -> Path:
    return make_split_dataset(tmp_path_factory.mktemp("birds"), train_per_class=8, val_per_class=4)


def test_training_from_scratch_writes_a_self_describing_classifier(split_data: Path, tmp_path: Path) -> None:
    result = train_classifier(tiny_config(split_data, tmp_path / "run", ema_decay=0.9, top_k=2))
    assert result.model_path == tmp_path / "run" / "vit_b16_3.pt"
    assert result.validation[3].top1 > 0.5  # 4 classes: chance is 0.25

    # No other argument needed: the file names its network, classes, input signature and colour statistics.
    (net, info) = birder.load_model(result.model_path)
    assert info.class_to_idx == {"class_0": 0, "class_1": 1, "class_2": 2, "class_3": 3}
    assert info.signature == make_signature(3, (32, 32), 4) and info.rgb_stats == {
        k: list(v) for k, v in NEUTRAL.items()
    }

    # The saved weights are the EMA ones; the state file keeps both.
    state = load_training_state(tmp_path / "run" / "vit_b16_3_states.pt")
    for key, value in net.state_dict().items():
        assert torch.equal(value, state["ema"]["module"][key]), key
    assert not all(torch.equal(state["model"][k], v) for k, v in state["ema"]["module"].items())

    rows = read_rows(tmp_path / "run" / "metrics.csv")
    assert list(rows[0]) == [
        "epoch", "step", "lr", "train_loss", "val_loss", "val_top1", "val_top2", "val_ece", "unreadable_images",
    ]  # fmt: skip
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    per_class = read_rows(tmp_path / "run" / "per_class_metrics.csv")
    assert len(per_class) == 3 * 4 and set(per_class[0]) == {"epoch", "class", "precision", "recall", "support"}
    assert (tmp_path / "run" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    confusion = read_rows(tmp_path / "run" / "confusion_matrix.csv", header=False)
    assert confusion[0][1:] == ["class_0", "class_1", "class_2", "class_3"]
    assert sum(int(v) for row in confusion[1:] for v in row[1:]) == 16


def test_linear_probe_trains_only_the_head(split_data: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    start = registry.net_factory("vit_b16", 4, config=TINY, size=(32, 32))
    info = birder.ModelInfo({f"class_{i}": i for i in range(4)}, None, NEUTRAL)
    birder.save_model(start, tmp_path / "start.pt", info)
    config = tiny_config(split_data, tmp_path / "run", init=tmp_path / "start.pt", network=None, model_config=None)
    config.freeze_body = True
    config.optimizer = "sgd"
    config.lr = 0.1
    config.epochs = 1
    result = train_classifier(config)

    (trained, _) = birder.load_model(result.model_path)
    for key, value in start.state_dict().items():
        assert torch.equal(value, trained.state_dict()[key]) == (not key.startswith("classifier.")), key


def test_init_keeps_the_head_for_the_same_classes_and_replaces_it_otherwise(split_data: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    start = registry.net_factory("vit_b16", 4, config=TINY, size=(32, 32))
    same = birder.ModelInfo({f"class_{i}": i for i in range(4)}, None, NEUTRAL)
    birder.save_model(start, tmp_path / "same.pt", same)
    other = birder.ModelInfo({f"class_{i}": 3 - i for i in range(4)}, None, NEUTRAL)  # same names, other order
    birder.save_model(start, tmp_path / "other.pt", other)

    from birder.training.classification import build_classifier

    class_to_idx = dict(same.class_to_idx)
    (kept, stats) = build_classifier(TrainConfig(output_dir=tmp_path, init=tmp_path / "same.pt"), class_to_idx)
    assert torch.equal(kept.classifier.weight, start.classifier.weight) and stats == same.rgb_stats
    (reset, _) = build_classifier(TrainConfig(output_dir=tmp_path, init=tmp_path / "other.pt"), class_to_idx)
    assert not torch.equal(reset.classifier.weight, start.classifier.weight)
    (resized, _) = build_classifier(TrainConfig(output_dir=tmp_path, init=tmp_path / "same.pt", size=48), class_to_idx)
    assert resized.size == (48, 48) and resized.pos_embedding.shape[1] == 1 + 6 * 6


def test_csv_labels_class_balancing_and_augmentation_extras(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "img", 6, classes=2)
    rows = [f"img/class_{c}/{i}.png,{'robin' if c == 0 else 'wren'}" for c in range(2) for i in range(6)]
    (tmp_path / "train.csv").write_text("path,label\n" + "\n".join(rows[:4] + rows[6:11]) + "\n")
    (tmp_path / "val.csv").write_text("\n".join([rows[4], rows[5], rows[11], "img/missing.png,wren"]) + "\n")
    config = tiny_config(
        None, tmp_path / "run", train_csv=tmp_path / "train.csv", val_csv=tmp_path / "val.csv",
        class_balanced=True, aug_level=3, mixup_alpha=0.4, cutmix_alpha=1.0, label_smoothing=0.1,
        layer_decay=0.75, accumulation_steps=2, clip_grad_norm=1.0, warmup_epochs=1, epochs=2,
    )  # fmt: skip
    result = train_classifier(config)
    assert result.class_to_idx == {"robin": 0, "wren": 1}
    assert result.validation[2].samples == 3  # the missing file is skipped, not fatal ...
    metrics = read_rows(tmp_path / "run" / "metrics.csv")
    assert [row["unreadable_images"] for row in metrics] == ["1", "1"]  # ... and counted


def test_cli_user_errors_are_one_line_exit_2(split_data: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "no_val" / "train" / "a").mkdir(parents=True)
    make_image_folder(tmp_path / "no_val" / "train", 1, classes=1)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 broken")
    bad_init = ["--data-dir", str(split_data), "--init", str(tmp_path / "bad.pt")]
    base = ["--output-dir", str(tmp_path / "run"), "--workers", "0", "--no-progress", "--size", "32"]
    cases = {
        "no validation folder": ["--data-dir", str(tmp_path / "no_val"), "--network", "vit_b16"],
        "no class folders with images": ["--data-dir", str(tmp_path / "empty"), "--network", "vit_b16"],
        "bad.pt: truncated or not a PyTorch checkpoint": bad_init,
        "pass a network": ["--data-dir", str(split_data)],
        "needs a --val-csv": ["--train-csv", str(tmp_path / "x.csv"), "--network", "vit_b16"],
    }  # fmt: skip
    for expected, args in cases.items():
        assert train_script.main(args + base) == 2, expected
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("birder-train: error: ") and expected in err


def test_birder_eval(split_data: Path, tmp_path: Path, capsys) -> None:
    result = train_classifier(tiny_config(split_data, tmp_path / "run", epochs=2))
    (scored, unreadable) = evaluate_checkpoint(result.model_path, split_data / "val", workers=0, progress_bar=False)
    assert scored.samples == 16 and unreadable == 0
    assert scored.top1 == pytest.approx(result.validation[2].top1)  # the same transform as training's validation

    argv = [str(result.model_path), str(split_data / "val"), "--workers", "0", "--no-progress", "--top-k", "2"]
    assert evaluate_script.main([*argv, "--output-dir", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "images: 16" in out and "top-2:" in out and "class_3" in out
    assert {p.name for p in (tmp_path / "report").iterdir()} == {
        "per_class.csv", "confusion_matrix.csv", "confusion_matrix.png",
    }  # fmt: skip

    encoder = registry.net_factory("vit_b16", 0, config=TINY, size=(32, 32))
    encoder_info = birder.ModelInfo({}, None, NEUTRAL)
    birder.save_model(encoder, tmp_path / "vit_b16_mim_1.pt", encoder_info, task="masked_image_modeling")
    assert evaluate_script.main([str(tmp_path / "vit_b16_mim_1.pt"), str(split_data / "val"), "--workers", "0"]) == 2
    assert "without classes" in capsys.readouterr().err
    assert evaluate_script.main([str(result.model_path), str(tmp_path / "nowhere"), "--workers", "0"]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_each_unreadable_image_is_counted_once(tmp_path: Path, caplog) -> None:
    # Two unreadable training images side by side: the first one's replacement walks over the second, so counting
    # what each sample met would count the second twice. Plus one unreadable validation image.
    data = make_split_dataset(tmp_path / "birds", train_per_class=2, val_per_class=1)
    for broken in ("train/class_1/1a_broken.jpg", "train/class_1/1b_broken.jpg", "val/class_2/0a_broken.jpg"):
        (data / broken).write_bytes(b"not a jpeg")
    with caplog.at_level(logging.INFO, logger="birder"):
        train_classifier(tiny_config(data, tmp_path / "run", epochs=2))

    metrics = read_rows(tmp_path / "run" / "metrics.csv")
    assert [row["unreadable_images"] for row in metrics] == ["3", "3"]
    epoch_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(epoch_lines) == 2 and all("2 unreadable training images replaced" in line for line in epoch_lines)
