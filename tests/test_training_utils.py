"""Training building blocks: parameter groups, schedule, EMA, mixup/cutmix, metrics, states, plots."""

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VIT_CONFIG
from test_training_data import single_thread  # noqa: F401 (autouse fixture)

from birder.errors import BirderError, CheckpointError
from birder.model_registry import registry
from birder.plots import save_confusion_matrix_png, save_image_rows
from birder.training.ema import ModelEMA
from birder.training.evaluation import ClassificationMeter
from birder.training.metrics import MetricsCSV
from birder.training.mixup import MixupCutmix, smooth_one_hot, soft_target_cross_entropy
from birder.training.optim import build_optimizer, param_groups
from birder.training.schedule import WarmupCosine, cosine_with_warmup
from birder.training.state import (
    capture_rng_state,
    find_latest_state,
    load_training_state,
    restore_rng_state,
    save_training_state,
)


def _tiny_vit(num_classes: int = 3, network: str = "vit_reg4_b16"):
    torch.manual_seed(0)
    return registry.net_factory(network, num_classes, config={**TINY_VIT_CONFIG, "num_layers": 3}, size=(32, 32))


def test_vit_layer_ids() -> None:
    with torch.device("meta"):
        net = registry.net_factory("vit_reg4_l16_pn", 10)
    assert net.num_layer_ids == 26
    stem = ("conv_proj.weight", "pos_embedding", "class_token", "reg_tokens", "encoder.pre_block.0.weight")
    assert [net.layer_id(name) for name in stem] == [0] * len(stem)  # the _pn pre-norm belongs to the stem
    assert net.layer_id("encoder.block.0.attn.qkv.weight") == 1
    assert net.layer_id("encoder.block.23.mlp.3.bias") == 24
    assert net.layer_id("norm.weight") == net.layer_id("classifier.bias") == 25
    assert {net.layer_id(name) for (name, _) in net.named_parameters()} == set(range(26))


def test_mim_wrapper_no_weight_decay_covers_encoder_tokens_and_mask_token() -> None:
    encoder = registry.net_factory("vit_reg4_b16", 0, config=TINY_VIT_CONFIG, size=(32, 32))
    mae = registry.mim_net_factory("mae_vit", encoder, config={"decoder_dim": 32, "decoder_num_heads": 4})
    assert mae.no_weight_decay() == {"encoder.pos_embedding", "encoder.class_token", "encoder.reg_tokens", "mask_token"}
    groups = param_groups(mae, lr=1.0, weight_decay=0.05)
    undecayed = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(mae.mask_token) in undecayed and id(mae.encoder.pos_embedding) in undecayed
    assert id(mae.decoder_embed.weight) not in undecayed


def test_layer_decay_groups() -> None:
    net = _tiny_vit()
    groups = param_groups(net, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    layers = sorted({group["layer"] for group in groups})
    assert layers == [0, 1, 2, 3, 4]  # [stem, pos, tokens], 3 blocks, [norm, head]
    for group in groups:
        assert group["lr"] == pytest.approx(0.5 ** (4 - group["layer"]))

    by_param = {id(p): group for group in groups for p in group["params"]}
    for name, param in net.named_parameters():
        decayed = by_param[id(param)]["weight_decay"] > 0
        assert decayed == (param.ndim > 1 and name not in ("pos_embedding", "class_token", "reg_tokens")), name
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))


def test_groups_skip_frozen_parameters_and_need_a_vit_for_layer_decay() -> None:
    net = _tiny_vit()
    net.freeze(freeze_classifier=False)
    groups = param_groups(net, lr=0.1, weight_decay=0.0)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in net.classifier.parameters()}
    assert isinstance(build_optimizer("sgd", groups), torch.optim.SGD)

    with pytest.raises(BirderError, match="needs a network with layers"):
        param_groups(torch.nn.Linear(2, 2), lr=0.1, weight_decay=0.0, layer_decay=0.8)
    with pytest.raises(BirderError, match="unknown optimizer"):
        build_optimizer("adam", groups)
    net.freeze()
    with pytest.raises(BirderError, match="no trainable parameters"):
        param_groups(net, lr=0.1, weight_decay=0.0)


def test_warmup_then_cosine() -> None:
    schedule = WarmupCosine(total_steps=10, warmup_steps=4, min_lr_ratio=0.1)
    assert [schedule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(4) == 1.0
    assert schedule(7) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule(10) == pytest.approx(0.1) and schedule(50) == pytest.approx(0.1)

    net = _tiny_vit()
    optimizer = build_optimizer("adamw", param_groups(net, lr=1e-3, weight_decay=0.0, layer_decay=0.5))
    scheduler = cosine_with_warmup(optimizer, total_steps=10, warmup_steps=0, min_lr=1e-4)
    head_lr = optimizer.param_groups[-1]["lr"]
    assert head_lr == pytest.approx(1e-3)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(1e-4)  # min_lr at full scale
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.5**4)  # ... and scaled with the layer


def test_ema_follows_weights() -> None:
    net = torch.nn.Linear(2, 2)
    ema = ModelEMA(net, decay=0.5)
    with torch.no_grad():
        net.weight.fill_(1.0)
    for _ in range(60):
        ema.update(net)
    torch.testing.assert_close(ema.module.weight, net.weight)
    assert not ema.module.weight.requires_grad

    restored = ModelEMA(torch.nn.Linear(2, 2), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 60 and restored.decay == 0.5
    torch.testing.assert_close(restored.module.weight, net.weight)


def test_mixup_cutmix_targets() -> None:
    targets = torch.tensor([0, 2, 1, 2])
    soft = smooth_one_hot(targets, 3, 0.3)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(4))
    assert soft[0].tolist() == pytest.approx([0.8, 0.1, 0.1])

    torch.manual_seed(0)
    mixing = MixupCutmix(3, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 8, 8)
    seen = set()
    for _ in range(30):
        (mixed, soft_targets) = mixing(images, targets)
        assert mixed.shape == images.shape
        torch.testing.assert_close(soft_targets.sum(dim=1), torch.ones(4))
        # The label weight of image 0 equals the share of image 0's pixels (value 0 vs partner value 3).
        # Plain floats: pytest.approx does not take 0-d tensors (TypeError from pytest 9.2 on).
        own_share = 1.0 - mixed[0].mean().item() / 3.0
        assert soft_targets[0, 0].item() == pytest.approx(0.1 / 3 + 0.9 * own_share, abs=1e-5)
        seen.add(round(own_share, 3) == 1.0)
    assert seen == {True, False}  # some batches unmixed, others mixed
    assert not MixupCutmix(3, 0.0, 0.0, 0.1).enabled
    assert soft_target_cross_entropy(torch.zeros(2, 3), smooth_one_hot(torch.tensor([0, 1]), 3, 0.0)).item() == (
        pytest.approx(math.log(3))
    )


def test_classification_meter() -> None:
    meter = ClassificationMeter(3, top_k=2, ece_bins=10)
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 1.0, 0.9], [2.0, 0.0, 3.0]])
    targets = torch.tensor([0, 1, 2, 0])
    meter.update(logits[:2], targets[:2])
    meter.update(logits[2:], targets[2:])
    result = meter.result(["a", "b", "c"])
    assert result.samples == 4 and result.top1 == 0.5 and result.top_k == 1.0 and result.k == 2
    assert result.confusion.tolist() == [[1, 0, 1], [0, 1, 0], [0, 1, 0]]
    assert [(c.precision, c.recall, c.support) for c in result.per_class[:2]] == [(1.0, 0.5, 2), (0.5, 1.0, 1)]
    assert result.per_class[2].precision == 0.0 and result.per_class[2].recall == 0.0
    assert result.loss == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item())
    probs = logits.softmax(1)
    (conf, pred) = probs.max(1)
    expected_ece = (
        sum(
            abs(float(conf[m].sum()) - float((pred[m] == targets[m]).sum()))
            for m in [(conf * 10).long() == b for b in range(10)]
        )
        / 4
    )
    assert result.ece == pytest.approx(expected_ece)
    assert math.isnan(ClassificationMeter(2).result(["a", "b"]).per_class[0].recall)


def test_metrics_csv_append_and_truncate(tmp_path: Path) -> None:
    metrics = MetricsCSV(tmp_path / "m.csv", ["epoch", "loss"])
    metrics.append({"epoch": 1, "loss": 0.123456789}, {"epoch": 2, "loss": 0.5})
    metrics.append({"epoch": 3, "loss": 1e-7})
    assert (tmp_path / "m.csv").read_text() == "epoch,loss\n1,0.123457\n2,0.5\n3,1e-07\n"
    metrics.truncate_after(1)
    assert (tmp_path / "m.csv").read_text() == "epoch,loss\n1,0.123457\n"


def test_rng_state_round_trip_through_a_state_file(tmp_path: Path) -> None:
    torch.manual_seed(5)
    state = {"rng": capture_rng_state(), "global_step": 3, "epoch_complete": True, "epoch": 1}
    path = save_training_state(tmp_path / "run_1_states.pt", state)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    restore_rng_state(load_training_state(path)["rng"])
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]

    save_training_state(tmp_path / "run_step_states.pt", {"global_step": 5, "epoch_complete": False, "epoch": 2})
    (tmp_path / "run_0_states.pt").write_bytes(b"garbage")
    assert find_latest_state(tmp_path, "run") == tmp_path / "run_step_states.pt"


def test_damaged_state_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "x_states.pt").write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(CheckpointError, match="truncated or not a training-state file"):
        load_training_state(tmp_path / "x_states.pt")
    torch.save({"state": {}}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="not a birder training-state file"):
        load_training_state(tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="no such"):
        load_training_state(tmp_path / "missing_states.pt")


def test_set_drop_path_rate_is_linear_over_blocks() -> None:
    net = _tiny_vit()
    net.set_drop_path_rate(0.2)
    assert [block.drop_path.p for block in net.encoder.block] == pytest.approx([0.0, 0.1, 0.2])


def test_pngs(tmp_path: Path) -> None:
    confusion = torch.tensor([[3, 1], [0, 4]])
    path = save_confusion_matrix_png(confusion, ["robin", "wren"], tmp_path / "cm.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = [torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8)]
    grid = save_image_rows(rows, {"mean": (0.5,) * 3, "std": (0.5,) * 3}, tmp_path / "grid.png")
    from PIL import Image

    with Image.open(grid) as image:
        assert image.size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)
