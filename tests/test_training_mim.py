"""MAE pretraining (``train_mim`` / ``birder-train-mim``): the loss falls, the files are right, errors are clear."""

import logging
import math
from pathlib import Path

import torch
from test_training_data import make_image_folder, single_thread  # noqa: F401 (autouse fixture)

import birder
from birder.scripts import train_mim as train_mim_script
from birder.training.mim import MIMTrainConfig, load_mim_model, train_mim

TINY_ENCODER = {"hidden_dim": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 64, "patch_size": 8}
TINY_DECODER = {"decoder_dim": 32, "decoder_depth": 1, "decoder_num_heads": 4, "decoder_mlp_dim": 64}


def tiny_config(data: Path, output: Path, **overrides) -> MIMTrainConfig:
    settings = {
        "data_dirs": [data],
        "output_dir": output,
        "network": "vit_b16",
        "model_config": TINY_ENCODER,
        "mim_config": TINY_DECODER,
        "size": 32,
        "rgb_stats": "neutral",
        "epochs": 4,
        "batch_size": 8,
        "lr": 2e-3,
        "warmup_epochs": 1,
        "workers": 0,
        "save_every": 2,
        "progress_bar": False,
        "visualize": 4,
        **overrides,
    }
    return MIMTrainConfig(**settings)


def test_pretraining_lowers_the_loss_and_writes_every_output(tmp_path: Path, caplog) -> None:
    data = make_image_folder(tmp_path / "photos", 8)
    broken = tmp_path / "photos" / "class_2" / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with caplog.at_level(logging.WARNING):
        result = train_mim(tiny_config(data, tmp_path / "run"))

    losses = list(result.epoch_losses.values())
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0]

    # Unreadable images: named once in the log, counted every epoch.
    assert [r.getMessage() for r in caplog.records if "broken.jpg" in r.getMessage()] == [
        f"skipped (unreadable): cannot read image '{broken}': not a recognised image format"
    ]
    rows = (tmp_path / "run" / "mim_metrics.csv").read_text().splitlines()
    assert rows[0] == "epoch,step,loss,lr,unreadable_images" and len(rows) == 5
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2", "3", "4"]
    assert all(row.endswith(",1") for row in rows[1:])

    files = {path.name for path in (tmp_path / "run").iterdir()}
    for epoch in (2, 4):
        assert {f"vit_b16_mim_{epoch}.pt", f"mae_vit_vit_b16_{epoch}.pt", f"mae_vit_vit_b16_{epoch}_states.pt"} <= files
    assert {f"mim_reconstruction_{epoch}.png" for epoch in (1, 2, 3, 4)} <= files
    assert not any(name.endswith(".tmp") for name in files)

    # The encoder alone: a headless ViT in the SPEC section 3 format, loadable at another size.
    (encoder, info) = birder.load_model(result.encoder_path, new_size=(48, 48))
    assert info.class_to_idx == {} and info.signature["outputs"][0]["data_shape"] == [0, 0]
    assert encoder.size == (48, 48) and encoder.num_classes == 0
    assert encoder(torch.randn(1, 3, 48, 48)).shape == (1, 32)  # the embedding

    # The whole MAE model, whose encoder is the same weights.
    (mae, metadata) = load_mim_model(result.model_path)
    assert metadata["task"] == "masked_image_modeling" and metadata["encoder"] == "vit_b16"
    (encoder_32, _) = birder.load_model(result.encoder_path)
    for key, value in encoder_32.state_dict().items():
        assert torch.equal(mae.encoder.state_dict()[key], value), key


def test_reconstruction_png_shows_original_masked_reconstructed_rows(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "photos", 2, classes=2)
    train_mim(tiny_config(data, tmp_path / "run", epochs=1, visualize=3))
    from PIL import Image

    with Image.open(tmp_path / "run" / "mim_reconstruction_1.png") as grid:
        assert grid.size == (3 * 32 + 4 * 2, 3 * 32 + 4 * 2)  # 3 images across, 3 rows, 2-px padding


def test_cli_errors_are_one_line_with_exit_status_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    base = ["--output-dir", str(tmp_path / "run"), "--workers", "0", "--no-progress"]
    cases = {
        "empty": ["--data-dir", str(tmp_path / "empty")],
        "no such directory": ["--data-dir", str(tmp_path / "missing")],
        "unknown network 'vit_q16'": ["--data-dir", str(make_image_folder(tmp_path / "ok", 1)), "--network", "vit_q16"],
    }
    for expected, args in cases.items():
        assert train_mim_script.main(args + base) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after any log lines
        assert err.startswith("birder-train-mim: error: ") and expected in err

    (tmp_path / "bad_states.pt").write_bytes(b"garbage")
    tiny = ["--model-config", '{"hidden_dim": 32, "num_layers": 1, "num_heads": 4, "mlp_dim": 64}', "--size", "32"]
    args = ["--data-dir", str(tmp_path / "ok"), "--resume", str(tmp_path / "bad_states.pt"), *tiny, *base]
    assert train_mim_script.main(args) == 2
    assert "bad_states.pt: truncated or not a training-state file" in capsys.readouterr().err


def test_cli_trains_and_resumes_latest(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "photos", 2, classes=2)
    common = [
        "--data-dir", str(data), "--output-dir", str(tmp_path / "run"), "--network", "vit_b16",
        "--model-config", '{"hidden_dim": 32, "num_layers": 1, "num_heads": 4, "mlp_dim": 64, "patch_size": 8}',
        "--mim-network", "mae_vit_dec1_npl", "--mim-config", '{"decoder_dim": 32, "decoder_num_heads": 4}',
        "--size", "32", "--rgb-stats", "neutral", "--epochs", "2", "--batch-size", "4", "--workers", "0",
        "--no-progress", "--visualize", "0",
    ]  # fmt: skip
    assert train_mim_script.main([*common, "--stop-epoch", "1"]) == 0
    assert (tmp_path / "run" / "vit_b16_mim_1.pt").is_file()
    assert train_mim_script.main([*common, "--resume"]) == 0  # "latest": continues with epoch 2
    assert (tmp_path / "run" / "vit_b16_mim_2.pt").is_file()
    assert len((tmp_path / "run" / "mim_metrics.csv").read_text().splitlines()) == 3


def test_mixed_precision_with_clipping(tmp_path: Path) -> None:
    # fp16 goes through the gradient scaler (unscaled before clipping); bf16 needs no scaler.
    data = make_image_folder(tmp_path / "photos", 2)
    for amp in ("fp16", "bf16"):
        result = train_mim(tiny_config(data, tmp_path / amp, epochs=2, amp=amp, clip_grad_norm=0.5, visualize=2))
        assert all(math.isfinite(loss) for loss in result.epoch_losses.values())
        assert (tmp_path / amp / "mim_reconstruction_2.png").is_file()
