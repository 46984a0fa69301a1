"""``--fsdp`` (fully-sharded data parallel) and ``--activation-checkpointing``.

Two CPU processes under ``torchrun`` (gloo) train a tiny ViT with DDP and with FSDP from the same start: the same
weights within float32 tolerance, model files that ``birder.load_model`` reads, sharded training states that
resume exactly (and move between FSDP and DDP runs), and MAE pretraining under FSDP. The refusals and the sharded
state files are checked in one process.
"""

import shutil
from pathlib import Path

import pytest
import torch
from test_pipeline import read_rows
from test_training_classification import tiny_config
from test_training_data import make_image_folder, make_split_dataset, single_thread  # noqa: F401 (autouse)
from test_training_distributed import MIM_CONFIG, torchrun

import birder
from birder.distributed import DistInfo
from birder.errors import BirderError, CheckpointError
from birder.scripts import train as train_script
from birder.training import fsdp as sharding
from birder.training.classification import train_classifier
from birder.training.mim import load_mim_model
from birder.training.state import load_training_state

NO_DROP = '{"hidden_dim": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 64, "patch_size": 8, "drop_path_rate": 0.0}'
# Every stateful part of the loop that FSDP changes: accumulation (gradients reduce-scattered every micro-batch),
# clipping (the norm over the shards), EMA (a sharded copy), warm-up; no random augmentation, no dropout.
RECIPE = ["--network", "vit_b16", "--model-config", NO_DROP, "--size", "32", "--rgb-stats", "neutral",
          "--epochs", "2", "--batch-size", "4", "--lr", "2e-3", "--warmup-epochs", "1", "--accumulation-steps", "2",
          "--clip-grad-norm", "1.0", "--ema-decay", "0.9", "--aug-level", "0", "--seed", "3", "--workers", "0",
          "--save-every", "1", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def birds(tmp_path_factory) -> Path:
    # 18 training images (9 a rank: batches of 4, 4, 1); 9 validation images, 5 and 4 a rank: two batches on
    # rank 0, one on rank 1, so the sharded model's evaluation must keep rank 1 in step.
    return make_split_dataset(tmp_path_factory.mktemp("birds"), train_per_class=6, val_per_class=3, classes=3)


def train(birds: Path, output: Path, *args: str) -> None:
    run = torchrun("birder.scripts.train", ["--data-dir", str(birds), "--output-dir", str(output), *RECIPE, *args],
                   output.parent)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return birder.load_model(path)[0].state_dict()


def assert_same_weights(a: Path, b: Path, *, atol: float, rtol: float) -> None:
    (first, second) = (weights(a), weights(b))
    assert first.keys() == second.keys()
    for key, value in first.items():
        torch.testing.assert_close(second[key], value, atol=atol, rtol=rtol, msg=key)


@pytest.fixture(scope="module")
def ddp_run(birds: Path, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("ddp") / "run"
    train(birds, output)
    return output


@pytest.fixture(scope="module")
def fsdp_run(birds: Path, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("fsdp") / "run"
    train(birds, output, "--fsdp")
    return output


def test_fsdp_trains_like_ddp_and_writes_whole_model_files(ddp_run: Path, fsdp_run: Path) -> None:
    # About 11 s on 2 cores: two torchrun jobs of two processes (the fixtures, shared with the slow tests below).
    for epoch in (1, 2):
        assert_same_weights(ddp_run / f"vit_b16_{epoch}.pt", fsdp_run / f"vit_b16_{epoch}.pt", atol=1e-5, rtol=1e-4)
    for ddp_row, fsdp_row in zip(read_rows(ddp_run / "metrics.csv"), read_rows(fsdp_run / "metrics.csv"), strict=True):
        assert ddp_row["step"] == fsdp_row["step"] and ddp_row["val_top1"] == fsdp_row["val_top1"]
        assert float(fsdp_row["val_loss"]) == pytest.approx(float(ddp_row["val_loss"]), rel=1e-4)
    assert [row["step"] for row in read_rows(fsdp_run / "metrics.csv")] == ["2", "4"]

    # The model file is the usual one (EMA weights, classes, signature); the state is small and names its shards.
    (net, info) = birder.load_model(fsdp_run / "vit_b16_2.pt")
    assert net.num_classes == 3 and info.class_to_idx == {"class_0": 0, "class_1": 1, "class_2": 2}
    state = load_training_state(fsdp_run / "vit_b16_2_states.pt")
    assert "model" not in state and "optimizer" not in state and state["ema"]["updates"] == 4
    folder = fsdp_run / state["sharded"]["folder"]
    assert state["sharded"]["world_size"] == 2 and folder.name.startswith("vit_b16_2_states.")
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in fsdp_run.glob("*.dcp*")) == sorted(
        load_training_state(fsdp_run / f"vit_b16_{epoch}_states.pt")["sharded"]["folder"] for epoch in (1, 2)
    )  # one folder per state file, none left unfinished


@pytest.mark.slow
def test_fsdp_stop_and_resume_equals_uninterrupted(birds: Path, fsdp_run: Path, tmp_path: Path) -> None:
    # About 11 s (22 s alone, with the fixture): a run stopped after epoch 1, then `--resume` (the latest state).
    output = tmp_path / "run"
    train(birds, output, "--fsdp", "--stop-epoch", "1")
    assert not (output / "vit_b16_2.pt").exists()
    train(birds, output, "--fsdp", "--resume")

    assert_same_weights(fsdp_run / "vit_b16_2.pt", output / "vit_b16_2.pt", atol=1e-6, rtol=0)
    assert (output / "metrics.csv").read_text() == (fsdp_run / "metrics.csv").read_text()


@pytest.mark.slow
def test_states_move_between_fsdp_and_ddp_runs(birds: Path, ddp_run: Path, fsdp_run: Path, tmp_path: Path) -> None:
    # About 11 s (33 s alone, with the fixtures). A DDP state resumed with --fsdp (each rank keeps its shards of
    # the whole tensors), and a sharded state resumed without (DCP gathers the whole tensors): each goes on as its
    # own run did.
    (to_fsdp, to_ddp) = (tmp_path / "to_fsdp", tmp_path / "to_ddp")
    to_fsdp.mkdir()
    shutil.copy(ddp_run / "vit_b16_1_states.pt", to_fsdp)
    to_ddp.mkdir()
    folder = load_training_state(fsdp_run / "vit_b16_1_states.pt")["sharded"]["folder"]
    shutil.copy(fsdp_run / "vit_b16_1_states.pt", to_ddp)
    shutil.copytree(fsdp_run / folder, to_ddp / folder)

    train(birds, to_fsdp, "--fsdp", "--resume")
    train(birds, to_ddp, "--resume")
    assert_same_weights(ddp_run / "vit_b16_2.pt", to_fsdp / "vit_b16_2.pt", atol=1e-5, rtol=1e-4)
    assert_same_weights(fsdp_run / "vit_b16_2.pt", to_ddp / "vit_b16_2.pt", atol=1e-5, rtol=1e-4)
    assert "model" in load_training_state(to_ddp / "vit_b16_2_states.pt")  # a DDP run writes its own kind


def test_mim_with_fsdp_bf16_and_activation_checkpointing(tmp_path: Path) -> None:
    # About 6 s: one epoch of MAE, the encoder and decoder blocks sharded, a state every step.
    unlabeled = make_image_folder(tmp_path / "unlabeled", 4)
    output = tmp_path / "mim"
    run = torchrun(
        "birder.scripts.train_mim",
        ["--data-dir", str(unlabeled), "--output-dir", str(output), "--model-config", NO_DROP, "--mim-config",
         MIM_CONFIG, "--size", "32", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--no-progress",
         "--visualize", "4", "--save-every-steps", "1", "--fsdp", "--amp", "bf16", "--activation-checkpointing"],
        tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "activation checkpointing: 3 blocks" in run.stderr  # 2 encoder blocks, 1 decoder block

    (encoder, info) = birder.load_model(output / "vit_b16_mim_1.pt")
    assert encoder.num_classes == 0 and info.class_to_idx == {}
    assert encoder(torch.randn(1, 3, 32, 32)).shape == (1, 32)
    (mae, _) = load_mim_model(output / "mae_vit_vit_b16_1.pt")
    for key, value in encoder.state_dict().items():
        assert torch.equal(mae.encoder.state_dict()[key], value), key
    assert (output / "mim_reconstruction_1.png").read_bytes()[:4] == b"\x89PNG"
    # 16 images, 2 ranks, batches of 4: two steps; the rolling step state keeps only its latest shards.
    step_state = load_training_state(output / "mae_vit_vit_b16_step_states.pt")
    assert step_state["global_step"] == 2
    assert [p.name for p in output.glob("mae_vit_vit_b16_step_states.*.dcp*")] == [step_state["sharded"]["folder"]]


# In one process


def test_fsdp_needs_torchrun_and_refuses_compile(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_split_dataset(tmp_path / "birds", train_per_class=1, val_per_class=1)
    with pytest.raises(BirderError, match="launch with torchrun --nproc_per_node N"):
        train_classifier(tiny_config(data, tmp_path / "a", fsdp=True))
    with pytest.raises(BirderError, match="--fsdp with --compile is not supported"):
        train_classifier(tiny_config(data, tmp_path / "b", fsdp=True, compile=True))
    with pytest.raises(BirderError, match="--activation-checkpointing with --compile is not supported"):
        train_classifier(tiny_config(data, tmp_path / "c", activation_checkpointing=True, compile=True))

    argv = ["--network", "vit_b16", "--data-dir", str(data), "--output-dir", str(tmp_path / "d"), "--fsdp"]
    assert train_script.main([*argv, "--workers", "0", "--no-progress"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the log lines, one line
    assert error.startswith("birder-train: error: --fsdp shards the model over the processes of a torchrun job")


def test_activation_checkpointing_gives_the_same_weights(tmp_path: Path) -> None:
    # Drop path on (the tiny vit_b16's 0.1): the recomputed blocks must replay the same random masks.
    data = make_split_dataset(tmp_path / "birds", train_per_class=4, val_per_class=1)
    settings = {"epochs": 1, "aug_level": 0, "ema_decay": 0.9, "clip_grad_norm": 1.0}
    plain = train_classifier(tiny_config(data, tmp_path / "plain", **settings))
    checkpointed = train_classifier(tiny_config(data, tmp_path / "ac", activation_checkpointing=True, **settings))
    assert checkpointed.epoch_losses == plain.epoch_losses
    assert_same_weights(plain.model_path, checkpointed.model_path, atol=0, rtol=0)  # same keys, same values


def test_sharded_state_folders_are_replaced_whole(tmp_path: Path) -> None:
    # One process: DCP writes and reads without a process group, as a plain run reading a sharded state does.
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    states = tmp_path / "net_step_states.pt"
    folders = []
    for value in (1.0, 2.0):
        folders.append(sharding.save_shards(states, {"model": {"w": torch.full((3,), value)}}, dist))
        sharding.remove_stale_shards(states, keep=folders[-1])
    (tmp_path / "net_1_states.x.dcp").mkdir()  # another state file's folder: not touched

    assert folders[0] != folders[1] and not (tmp_path / folders[0]).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([folders[1], "net_1_states.x.dcp"])
    parts = {"model": {"w": torch.zeros(3)}}
    sharding.load_shards(tmp_path / folders[1], parts)
    assert parts["model"]["w"].tolist() == [2.0, 2.0, 2.0]
    with pytest.raises(CheckpointError, match="missing or incomplete sharded training state"):
        sharding.load_shards(tmp_path / folders[0], parts)
