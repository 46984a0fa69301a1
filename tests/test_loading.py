"""Model files: parity with the published Birder's checkpoints and outputs, round trips, clear errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, TINY_VIT_CONFIG, make_tiny_vit

import birder
from birder.errors import CheckpointError
from birder.inference.classification import infer_image
from birder.io.checkpoint import make_signature, read_checkpoint

# Fixture stem -> what the caller must pass (Birder 0.2.2 did not store the config override).
REFERENCE_MODELS = {
    "legacy_vit_small": {"custom_config": {"hidden_dim": 64, "num_layers": 2, "num_heads": 4, "mlp_dim": 128}},
    "current_vit_small": {},
    "current_vit_reg4_small": {},
    "current_vit_pn_small": {},  # vit_b16_pn: Birder stores its pre-norm as encoder.pre_block.0.*
}
TENSOR_TOLERANCE = 1e-4  # logits, embeddings, features, probabilities (fixtures README)


def _info(stem: str) -> dict:
    return json.loads((FIXTURES / f"{stem}_info.json").read_text())


def _load_reference(stem: str):
    (net, model_info) = birder.load_model(
        FIXTURES / f"{stem}.pt", network=_info(stem)["network"], inference=True, **REFERENCE_MODELS[stem]
    )
    reference = torch.load(FIXTURES / f"{stem}_reference.pt", weights_only=True)
    return (net, model_info, reference)


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.mark.parametrize("stem", list(REFERENCE_MODELS))
def test_reference_checkpoint_reproduces_outputs(stem: str) -> None:
    (net, model_info, reference) = _load_reference(stem)
    metadata = _info(stem)["checkpoint_metadata"]
    assert model_info.class_to_idx == metadata["class_to_idx"]
    assert model_info.signature == metadata["signature"]

    x = reference["input"]
    with torch.inference_mode():
        assert _max_diff(net(x), reference["logits"]) <= TENSOR_TOLERANCE
        assert _max_diff(net.embedding(x), reference["embedding"]) <= TENSOR_TOLERANCE
        if "neck" in reference["detection_features"]:
            features = net.detection_features(x)
        else:
            # Today's Birder returns the last block's output without the final norm: out_indices=[-1].
            (staged, _) = birder.load_model(
                FIXTURES / f"{stem}.pt",
                network=_info(stem)["network"],
                custom_config={**(model_info.custom_config or {}), "out_indices": [-1]},
                inference=True,
            )
            features = staged.detection_features(x)

        for key, expected in reference["detection_features"].items():
            assert features[key].shape == expected.shape
            assert _max_diff(features[key], expected) <= TENSOR_TOLERANCE

    size = birder.get_size_from_signature(model_info.signature)
    transform = birder.classification_transform(size, model_info.rgb_stats)
    (probs, embedding) = infer_image(net, str(FIXTURES / f"{stem}_photo.png"), transform, return_embedding=True)
    assert probs.shape == tuple(reference["photo_probs"].shape)
    assert _max_diff(probs, reference["photo_probs"]) <= TENSOR_TOLERANCE
    assert _max_diff(embedding, reference["photo_embedding"]) <= TENSOR_TOLERANCE


def test_legacy_checkpoint_loads_without_key_surgery() -> None:
    (state, _) = read_checkpoint(FIXTURES / "legacy_vit_small.pt")
    assert "encoder.block.0.self_attention.in_proj_weight" in state
    (net, _, _) = _load_reference("legacy_vit_small")
    assert "encoder.block.0.attn.qkv.weight" in net.state_dict()


def test_inference_flag_gives_eval_mode_and_no_grad() -> None:
    (net, _, _) = _load_reference("current_vit_small")
    assert not net.training
    assert not any(p.requires_grad for p in net.parameters())

    (trainable, _) = birder.load_model(FIXTURES / "current_vit_small.pt", network="vit_l16")
    assert all(p.requires_grad for p in trainable.parameters())
    assert not any(p.is_meta for p in trainable.parameters())


@pytest.mark.parametrize("extension", ["pt", "safetensors"])
def test_round_trip_gives_identical_outputs(tmp_path: Path, extension: str) -> None:
    net = make_tiny_vit(num_classes=3, network="vit_reg4_b16_ls")
    class_to_idx = {"Parus major": 0, "Erithacus rubecula": 1, "Pica pica": 2}
    model_info = birder.ModelInfo(
        class_to_idx, make_signature(3, net.size, 3), {"mean": (0.5,) * 3, "std": (0.25,) * 3}
    )
    path = birder.save_model(net, tmp_path / f"model.{extension}", model_info)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"model.{extension}"]  # no temporary file left

    (loaded, loaded_info) = birder.load_model(path, inference=True)  # the file names its network
    assert loaded.network_name == "vit_reg4_b16_ls"
    assert loaded_info.class_to_idx == class_to_idx
    assert loaded_info.signature == model_info.signature
    assert loaded_info.custom_config == TINY_VIT_CONFIG
    assert tuple(loaded_info.rgb_stats["mean"]) == (0.5,) * 3
    x = torch.randn(2, 3, *net.size)
    with torch.inference_mode():
        assert torch.equal(loaded(x), net(x))


def test_pt_file_has_birder_layout(tmp_path: Path) -> None:
    net = make_tiny_vit(num_classes=2)
    info = birder.ModelInfo({"a": 0, "b": 1}, make_signature(3, net.size, 2), {"mean": (0, 0, 0), "std": (1, 1, 1)})
    path = birder.save_model(net, tmp_path / "vit_b16_tiny.pt", info)
    content = torch.load(path, weights_only=True)
    assert {"state", "birder_version", "task", "signature", "class_to_idx", "rgb_stats", "config"} <= set(content)
    assert content["task"] == "image_classification"
    assert content["signature"] == {"inputs": [{"data_shape": [0, 3, 32, 48]}], "outputs": [{"data_shape": [0, 2]}]}


def test_new_size_on_load(tmp_path: Path) -> None:
    net = make_tiny_vit(num_classes=2, size=(32, 32))
    info = birder.ModelInfo({"a": 0, "b": 1}, None, {"mean": (0, 0, 0), "std": (1, 1, 1)})
    path = birder.save_model(net, tmp_path / "m.pt", info)
    (loaded, _) = birder.load_model(path, new_size=(48, 48))
    assert loaded.size == (48, 48)
    assert loaded.pos_embedding.shape == (1, 1 + 9, 32)


def test_new_size_on_load_gives_the_new_signature(tmp_path: Path) -> None:
    """The signature returned (and saved again) must describe the resized network, not the file's old size."""
    net = make_tiny_vit(num_classes=2, size=(32, 32))
    info = birder.ModelInfo({"a": 0, "b": 1}, make_signature(3, (32, 32), 2), {"mean": (0, 0, 0), "std": (1, 1, 1)})
    path = birder.save_model(net, tmp_path / "m.pt", info)
    (loaded, loaded_info) = birder.load_model(path, new_size=(48, 64))
    assert birder.get_size_from_signature(loaded_info.signature) == (48, 64)
    assert loaded_info.signature["outputs"] == info.signature["outputs"]

    resaved = birder.save_model(loaded, tmp_path / "resized.pt", loaded_info)
    (reloaded, reloaded_info) = birder.load_model(resaved)
    assert birder.get_size_from_signature(reloaded_info.signature) == (48, 64)
    assert reloaded.size == (48, 64)


def test_pn_network_saves_birder_key_names(tmp_path: Path) -> None:
    """A _pn file we write has Birder's encoder.pre_block.0.* keys, so it loads back in the published Birder."""
    (net, model_info, _) = _load_reference("current_vit_pn_small")
    path = birder.save_model(net, tmp_path / "vit_b16_pn.pt", model_info)
    state = torch.load(path, weights_only=True)["state"]
    (reference_state, _) = read_checkpoint(FIXTURES / "current_vit_pn_small.pt")
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in reference_state.items()}


def test_pn_file_with_old_pre_norm_keys_loads(tmp_path: Path) -> None:
    """Files birder wrote before the pre-norm took Birder's name (``pre_norm.*``) still load, same outputs."""
    (net, _, reference) = _load_reference("current_vit_pn_small")
    state = {k.replace("encoder.pre_block.0.", "pre_norm."): v for k, v in net.state_dict().items()}
    assert "pre_norm.weight" in state
    path = tmp_path / "old_pn.pt"
    torch.save({"state": state, **_info("current_vit_pn_small")["checkpoint_metadata"]}, path)
    (loaded, _) = birder.load_model(path, network="vit_b16_pn", inference=True)
    with torch.inference_mode():
        assert _max_diff(loaded(reference["input"]), reference["logits"]) <= TENSOR_TOLERANCE


def test_checkpoint_of_another_network_names_the_mismatch(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as excinfo:
        birder.load_model(FIXTURES / "current_vit_small.pt", network="vit_reg4_b16")

    message = str(excinfo.value)
    assert "missing keys: reg_tokens" in message
    assert "pos_embedding (file (1, 17, 64), network (1, 21, 64))" in message
    assert "\n" not in message

    with pytest.raises(CheckpointError, match="shape mismatches"):
        birder.load_model(FIXTURES / "legacy_vit_small.pt", network="vit_l16")  # config not passed


def test_truncated_checkpoint(tmp_path: Path) -> None:
    data = (FIXTURES / "current_vit_small.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        birder.load_model(truncated, network="vit_l16")


def test_truncated_safetensors(tmp_path: Path) -> None:
    net = make_tiny_vit(num_classes=2)
    info = birder.ModelInfo({"a": 0, "b": 1}, None, {"mean": (0, 0, 0), "std": (1, 1, 1)})
    path = birder.save_model(net, tmp_path / "m.safetensors", info)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="safetensors"):
        birder.load_model(path)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").touch()
    with pytest.raises(CheckpointError, match="empty file"):
        birder.load_model(tmp_path / "empty.pt", network="vit_l16")
    with pytest.raises(CheckpointError, match="no such model file"):
        birder.load_model(tmp_path / "absent.pt", network="vit_l16")
    with pytest.raises(CheckpointError, match="unsupported model file extension"):
        birder.load_model(tmp_path / "model.ckpt", network="vit_l16")


class _Payload:
    """Stands for arbitrary code hidden in a pickle."""


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state": {}, "payload": _Payload()}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        birder.load_model(path, network="vit_l16")


def test_file_without_network_name_needs_one(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "current_vit_small.pt", tmp_path / "birder_file.pt")
    with pytest.raises(CheckpointError, match="pass network="):
        birder.load_model(tmp_path / "birder_file.pt")


def test_task_travels_with_the_loaded_network(tmp_path: Path) -> None:
    """A MIM encoder loaded and saved again (or converted) stays a MIM encoder: the task is on the network."""
    net = make_tiny_vit(num_classes=0)
    info = birder.ModelInfo({}, make_signature(3, net.size, 0), {"mean": (0, 0, 0), "std": (1, 1, 1)})
    path = birder.save_model(net, tmp_path / "vit_b16_mim_1.pt", info, task="masked_image_modeling")
    (loaded, loaded_info) = birder.load_model(path)
    assert loaded.network_name == "vit_b16"
    assert loaded.task == "masked_image_modeling"

    resaved = birder.save_model(loaded, tmp_path / "again.safetensors", loaded_info)
    assert read_checkpoint(resaved)[1]["task"] == "masked_image_modeling"
    assert make_tiny_vit(num_classes=2).task == "image_classification"
