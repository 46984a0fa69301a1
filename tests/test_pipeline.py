"""The whole two-stage pipeline through the console scripts, on generated photos with a tiny ViT:

``birder-train-mim`` (unlabeled photos) -> ``birder-train --init <encoder>`` (labeled photos, another input size)
-> ``birder-eval`` (held-out split) -> ``birder-predict`` and ``birder.load_model`` + ``infer_image``.
"""

import csv
from pathlib import Path

from test_training_data import make_image_folder, make_split_dataset, single_thread  # noqa: F401 (autouse)

import birder
from birder.inference.classification import infer_image
from birder.scripts import evaluate as evaluate_script
from birder.scripts import predict as predict_script
from birder.scripts import train as train_script
from birder.scripts import train_mim as train_mim_script

ENCODER_CONFIG = '{"hidden_dim": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 64, "patch_size": 8}'
QUIET = ["--workers", "0", "--no-progress"]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_pretrain_then_fine_tune_then_predict(tmp_path: Path, capsys) -> None:
    unlabeled = make_image_folder(tmp_path / "unlabeled", 10, seed=5)
    data = make_split_dataset(tmp_path / "birds", train_per_class=10, val_per_class=5)

    # Stage 1: MAE pretraining on unlabeled photos, 32 px.
    mim_args = [
        "--network", "vit_b16", "--model-config", ENCODER_CONFIG, "--data-dir", str(unlabeled),
        "--mim-config", '{"decoder_dim": 32, "decoder_depth": 1, "decoder_num_heads": 4, "decoder_mlp_dim": 64}',
        "--output-dir", str(tmp_path / "mim"), "--size", "32", "--epochs", "5", "--warmup-epochs", "1",
        "--batch-size", "8", "--lr", "2e-3", "--save-every", "5", "--visualize", "4", *QUIET,
    ]  # fmt: skip
    assert train_mim_script.main(mim_args) == 0
    losses = [float(row["loss"]) for row in read_rows(tmp_path / "mim" / "mim_metrics.csv")]
    assert len(losses) == 5 and losses[-1] < 0.8 * losses[0], losses
    encoder = tmp_path / "mim" / "vit_b16_mim_5.pt"

    # Stage 2: fine-tune the encoder on labeled photos at 48 px (position embedding resized, new head).
    train_args = [
        "--init", str(encoder), "--data-dir", str(data), "--output-dir", str(tmp_path / "ft"), "--size", "48",
        "--epochs", "4", "--batch-size", "8", "--lr", "2e-3", "--layer-decay", "0.9", "--warmup-epochs", "1",
        "--aug-level", "1", "--save-every", "4", *QUIET,
    ]  # fmt: skip
    assert train_script.main(train_args) == 0
    metrics = read_rows(tmp_path / "ft" / "metrics.csv")
    assert float(metrics[-1]["val_top1"]) > 0.5, metrics  # 4 classes: chance is 0.25
    model = tmp_path / "ft" / "vit_b16_4.pt"

    # The checkpoint describes itself: no network, size or statistics to pass.
    (net, info) = birder.load_model(model, inference=True)
    assert net.size == (48, 48) and info.class_to_idx == {f"class_{i}": i for i in range(4)}
    transform = birder.classification_transform(birder.get_size_from_signature(info.signature), info.rgb_stats)
    val_photos = sorted((data / "val").rglob("*.png"))
    idx_to_class = {index: name for name, index in info.class_to_idx.items()}
    hits = sum(idx_to_class[int(infer_image(net, p, transform)[0].argmax())] == p.parent.name for p in val_photos)
    assert hits / len(val_photos) > 0.5

    # birder-eval on the held-out split agrees with the training's own validation.
    capsys.readouterr()
    assert evaluate_script.main([str(model), str(data / "val"), "--workers", "0", "--no-progress"]) == 0
    assert f"top-1: {float(metrics[-1]['val_top1']):.4f}" in capsys.readouterr().out

    # birder-predict uses the file as it is.
    predict_args = [str(data / "val"), "--weights", str(model), "--output-dir", str(tmp_path / "pred")]
    assert predict_script.main([*predict_args, "-j", "0", "--no-progress", "--device", "cpu"]) == 0
    results = read_rows(tmp_path / "pred" / "results.csv")
    assert len(results) == len(val_photos)
    correct = sum(row["prediction"] == Path(row["path"]).parent.name for row in results)
    assert correct == hits  # the same decoder and transform as infer_image
