"""Training on several processes: ``torchrun`` with two CPU processes (gloo) and ``--compile`` (both ``-m slow``),
and the counting of unreadable images over ranks."""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_pipeline import ENCODER_CONFIG, read_rows
from test_training_classification import tiny_config as tiny_classifier_config
from test_training_data import make_image_folder, make_split_dataset, single_thread  # noqa: F401 (autouse)
from test_training_mim import tiny_config as tiny_mim_config

import birder
from birder.distributed import DistInfo
from birder.training import ddp as training_ddp
from birder.training.classification import train_classifier
from birder.training.mim import train_mim

ROOT = Path(__file__).resolve().parents[1]
BROKEN = b"not an image"
MIM_CONFIG = '{"decoder_dim": 32, "decoder_depth": 1, "decoder_num_heads": 4, "decoder_mlp_dim": 64}'


def torchrun(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    launcher = ["torchrun"] if shutil.which("torchrun") else [sys.executable, "-m", "torch.distributed.run"]
    command = [*launcher, "--standalone", "--nproc_per_node", "2", "-m", module, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_unreadable_files_are_counted_once_over_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Rank 0 of two met a.jpg, and c.jpg twice (a sample's replacement walked over it, then its own sample met
    # it); rank 1 met a.jpg as well (a padded epoch repeats a few samples on another rank).
    rank1_sends = ["cannot read 'a.jpg'"]
    monkeypatch.setattr(
        training_ddp, "all_gather_objects", lambda obj, info: [obj, rank1_sends] if info.distributed else [obj]
    )
    (cpu, met) = (torch.device("cpu"), ["cannot read 'a.jpg'", "cannot read 'c.jpg'", "cannot read 'c.jpg'"])

    counted = training_ddp.distinct_over_ranks(met, DistInfo(rank=0, world_size=2, local_rank=0, device=cpu))
    assert counted == {"cannot read 'a.jpg'", "cannot read 'c.jpg'"}
    alone = DistInfo(rank=0, world_size=1, local_rank=0, device=cpu)
    assert training_ddp.distinct_over_ranks(met, alone) == {"cannot read 'a.jpg'", "cannot read 'c.jpg'"}


@pytest.mark.slow
def test_torchrun_two_cpu_processes_pretrain_and_fine_tune(tmp_path: Path) -> None:
    unlabeled = make_image_folder(tmp_path / "unlabeled", 6)
    data = make_split_dataset(tmp_path / "birds", train_per_class=6, val_per_class=3)
    # One unreadable image in each set (replacing one, so that the counts below stay): the validation one is the
    # second file, which rank 1 scores. Each must be counted once, whichever rank met it.
    for broken in (
        unlabeled / "class_2" / "4.png",
        data / "train" / "class_3" / "5.png",
        data / "val" / "class_0" / "1.png",
    ):
        broken.write_bytes(BROKEN)
    common = ["--epochs", "2", "--batch-size", "4", "--lr", "2e-3", "--workers", "0", "--no-progress"]

    mim = torchrun(
        "birder.scripts.train_mim",
        ["--data-dir", str(unlabeled), "--output-dir", str(tmp_path / "mim"), "--model-config", ENCODER_CONFIG,
         "--mim-config", MIM_CONFIG, "--size", "32", "--save-every", "2", *common],
        tmp_path,
    )  # fmt: skip
    assert mim.returncode == 0, mim.stderr[-3000:]
    mim_files = sorted(p.name for p in (tmp_path / "mim").glob("*.pt"))
    assert mim_files == ["mae_vit_vit_b16_2.pt", "mae_vit_vit_b16_2_states.pt", "vit_b16_mim_2.pt"]
    assert mim.stderr.count("epoch 2/2: loss") == 1  # rank 0 logs, rank 1 stays quiet
    assert [row["unreadable_images"] for row in read_rows(tmp_path / "mim" / "mim_metrics.csv")] == ["1", "1"]

    train = torchrun(
        "birder.scripts.train",
        ["--init", str(tmp_path / "mim" / "vit_b16_mim_2.pt"), "--data-dir", str(data), "--output-dir",
         str(tmp_path / "ft"), "--save-every", "2", "--ema-decay", "0.9", "--accumulation-steps", "2", *common],
        tmp_path,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "ft").glob("*.pt")) == ["vit_b16_2.pt", "vit_b16_2_states.pt"]
    rows = read_rows(tmp_path / "ft" / "metrics.csv")
    assert [row["epoch"] for row in rows] == ["1", "2"]
    # 24 images on 2 ranks of batch 4: 3 batches each, 2 optimizer steps per epoch (accumulating 2).
    assert [row["step"] for row in rows] == ["2", "4"]
    assert [row["unreadable_images"] for row in rows] == ["2", "2"]  # one training, one validation image
    (net, info) = birder.load_model(tmp_path / "ft" / "vit_b16_2.pt")
    assert len(info.class_to_idx) == 4 and net.num_classes == 4


@pytest.mark.slow
def test_compile_trains_both_stages(tmp_path: Path) -> None:
    # Whole batches only (16 images, batches of 8): a short last batch would cost a recompilation.
    unlabeled = make_image_folder(tmp_path / "unlabeled", 4)
    result = train_mim(tiny_mim_config(unlabeled, tmp_path / "mim", epochs=2, compile=True, visualize=0))
    assert result.encoder_path is not None and all(math.isfinite(loss) for loss in result.epoch_losses.values())

    data = make_split_dataset(tmp_path / "birds", train_per_class=4, val_per_class=2)
    config = tiny_classifier_config(data, tmp_path / "ft", epochs=1, compile=True, ema_decay=0.9)
    config.init = result.encoder_path
    (config.network, config.model_config) = (None, None)
    trained = train_classifier(config)
    (net, _) = birder.load_model(trained.model_path)  # saved without the compiled wrapper's key prefix
    assert net.num_classes == 4
