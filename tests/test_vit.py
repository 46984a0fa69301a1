"""The ViT family: exact structure of the card's network, the contract every network follows, resizing."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES, TINY_VIT_CONFIG, make_tiny_vit

from birder.errors import BirderError
from birder.model_registry import registry
from birder.net.vit import rename_legacy_vit_keys


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {key: list(value.shape) for key, value in state.items()}


def _build_on_meta(name: str, num_classes: int, size: tuple[int, int], **kwargs):
    with torch.device("meta"):
        return registry.net_factory(name, num_classes, size=size, **kwargs)


def test_vit_l16_card_parameter_count_and_keys() -> None:
    net = _build_on_meta("vit_l16", 707, (256, 256))
    assert sum(p.numel() for p in net.parameters()) == 304_087_747
    expected = json.loads((FIXTURES / "vit_l16_707_256px_current_state_dict_shapes.json").read_text())
    # Same keys, same shapes, same order as Birder's current layout.
    assert list(_shapes(net.state_dict()).items()) == list(expected.items())
    assert net.embedding_size == 1024


def test_flop_count_of_the_card_network() -> None:
    net = _build_on_meta("vit_l16", 707, (256, 256))
    assert round(net.count_flops() / 1e9, 1) == 162.1
    # Matmul FLOPs of one block at 257 tokens, counted by hand: qkv, QK^T, AV, proj, two MLP layers.
    t, d, m = 257, 1024, 4096
    block = 2 * (t * d * 3 * d + t * t * d + t * t * d + t * d * d + t * d * m + t * m * d)
    stem_and_head = 2 * (256 * 1024 * 3 * 16 * 16 + 1024 * 707)
    assert net.count_flops() == 24 * block + stem_and_head


def test_legacy_layout_renames_to_current() -> None:
    legacy = json.loads((FIXTURES / "vit_l16_707_256px_legacy_state_dict_shapes.json").read_text())
    current = json.loads((FIXTURES / "vit_l16_707_256px_current_state_dict_shapes.json").read_text())
    fake_legacy_state = {key: torch.empty(0) for key in legacy}
    assert sorted(rename_legacy_vit_keys(fake_legacy_state)) == sorted(current)


@pytest.mark.parametrize(
    ("name", "layers", "width", "patch"),
    [("vit_t16", 12, 192, 16), ("vit_s14", 12, 384, 14), ("vit_m32", 12, 512, 32), ("vit_b16", 12, 768, 16),
     ("vit_l14", 24, 1024, 14), ("vit_h14", 32, 1280, 14)],
)  # fmt: skip
def test_named_sizes(name: str, layers: int, width: int, patch: int) -> None:
    net = _build_on_meta(name, 10, (patch * 4, patch * 4))
    assert (net.num_layers, net.hidden_dim, net.patch_size) == (layers, width, patch)
    assert net.config["mlp_dim"] == 4 * width


def test_registered_variants() -> None:
    for size in "tsmblh":
        for patch in (16, 14, 32):
            for prefix in ("vit_", "vit_reg1_", "vit_reg4_", "vit_reg8_"):
                for suffix in ("", "_avg", "_ls", "_pn"):
                    assert registry.exists(f"{prefix}{size}{patch}{suffix}")

    assert "vit_reg4_b16" in registry.list_models("vit_reg4_*")
    assert all(name.startswith("vit_reg8_") for name in registry.list_models("vit_reg8_*"))


def test_variant_structure() -> None:
    keys = set(_build_on_meta("vit_reg4_b16_ls", 3, (32, 32), config=TINY_VIT_CONFIG).state_dict())
    assert {"reg_tokens", "encoder.block.0.layer_scale_1.gamma", "encoder.block.1.layer_scale_2.gamma"} <= keys

    avg = _build_on_meta("vit_b16_avg", 3, (32, 32), config=TINY_VIT_CONFIG)
    assert "class_token" not in avg.state_dict()
    assert avg.pos_embedding.shape == (1, 4, 32)

    pn = _build_on_meta("vit_b16_pn", 3, (32, 32), config=TINY_VIT_CONFIG)
    assert pn.conv_proj.bias is None
    assert pn.encoder.pre_block[0].eps == 1e-5 and pn.norm.eps == 1e-5


def test_drop_path_defaults() -> None:
    assert _build_on_meta("vit_l16", 1, (32, 32)).config["drop_path_rate"] == 0.1
    assert _build_on_meta("vit_s16", 1, (32, 32)).config["drop_path_rate"] == 0.0


def test_contract_forward_is_classify_of_embedding() -> None:
    net = make_tiny_vit(num_classes=7, network="vit_reg4_b16", size=(32, 48))
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits = net(x)
        embedding = net.embedding(x)
        assert logits.shape == (2, 7)
        assert embedding.shape == (2, net.embedding_size)
        torch.testing.assert_close(net.classify(embedding), logits)
        # The embedding is the final-normed class token, which sits after the 4 registers.
        torch.testing.assert_close(net.forward_features(x)[:, 4], embedding)


def test_attention_matches_the_textbook_formula() -> None:
    net = make_tiny_vit()
    attn = net.encoder.block[0].attn
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(2))
    (q, k, v) = attn.qkv(x).reshape(2, 10, 3, 4, 8).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 10, 32))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_detection_features_neck_and_stages() -> None:
    net = make_tiny_vit(size=(32, 48))
    x = torch.randn(1, 3, 32, 48)
    with torch.inference_mode():
        neck = net.detection_features(x)["neck"]
        assert neck.shape == (1, 32, 2, 3)
        # The card's neck: patch tokens after the final norm, in grid order.
        tokens = net.forward_features(x)[:, 1:]
        torch.testing.assert_close(neck.flatten(2).transpose(1, 2), tokens)

        staged = registry.net_factory(
            "vit_b16", 5, config={**TINY_VIT_CONFIG, "out_indices": [0, -1]}, size=(32, 48)
        ).eval()
        staged.load_state_dict(net.state_dict())
        stages = staged.detection_features(x)
        assert list(stages) == ["stage1", "stage2"]
        assert stages["stage2"].shape == (1, 32, 2, 3)
        # The last stage is the last block's output without the final norm.
        (tokens, _) = net._tokens(x)
        last = net.encoder(tokens)[:, 1:].transpose(1, 2).reshape(1, 32, 2, 3)
        torch.testing.assert_close(stages["stage2"], last)


def test_out_indices_out_of_range_is_a_clear_error() -> None:
    with pytest.raises(BirderError, match="out of range"):
        registry.net_factory("vit_b16", 5, config={**TINY_VIT_CONFIG, "out_indices": [5]}, size=(32, 32))


def test_unknown_config_key_is_rejected() -> None:
    with pytest.raises(BirderError, match="hiden_dim"):
        registry.net_factory("vit_b16", 5, config={"hiden_dim": 64})


def test_size_not_multiple_of_patch() -> None:
    with pytest.raises(BirderError, match="multiple of the patch size"):
        registry.net_factory("vit_b16", 5, config=TINY_VIT_CONFIG, size=(30, 32))


def test_adjust_size_keeps_special_tokens_and_interpolates_bicubic() -> None:
    net = make_tiny_vit(network="vit_reg4_b16", size=(32, 48))
    old = net.pos_embedding.detach().clone()
    net.adjust_size((64, 64))
    assert net.size == (64, 64)
    assert net.pos_embedding.shape == (1, 5 + 16, 32)
    torch.testing.assert_close(net.pos_embedding[:, :5], old[:, :5])
    grid = old[:, 5:].reshape(1, 2, 3, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(net.pos_embedding[:, 5:], expected.permute(0, 2, 3, 1).reshape(1, 16, 32))
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_dynamic_size_matches_permanent_upsampling() -> None:
    # Upsampling is unaffected by antialias (up to kernel rounding), so on-the-fly and permanent resizing agree.
    net = make_tiny_vit(size=(32, 32))
    x = torch.randn(1, 3, 64, 48)
    with torch.inference_mode():
        dynamic = net(x)
        net.adjust_size((64, 48))
        torch.testing.assert_close(net(x), dynamic, atol=1e-4, rtol=1e-4)


def test_reset_classifier_and_freeze() -> None:
    net = make_tiny_vit(num_classes=5)
    net.reset_classifier(11)
    assert net.num_classes == 11
    assert net(torch.randn(1, 3, 32, 48)).shape == (1, 11)

    net.freeze(freeze_classifier=False)
    trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}

    net.unfreeze()
    net.freeze_stages(1)
    frozen = {name for name, p in net.named_parameters() if not p.requires_grad}
    assert "encoder.block.0.attn.qkv.weight" in frozen and "pos_embedding" in frozen
    assert "encoder.block.1.attn.qkv.weight" not in frozen


def test_headless_encoder_returns_embedding() -> None:
    net = make_tiny_vit(num_classes=0)
    assert "classifier.weight" not in net.state_dict()
    assert net(torch.randn(2, 3, 32, 48)).shape == (2, 32)


def test_stochastic_depth_only_in_training() -> None:
    net = registry.net_factory("vit_b16", 3, config={**TINY_VIT_CONFIG, "drop_path_rate": 0.5}, size=(32, 32))
    x = torch.randn(4, 3, 32, 32)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(x))
        net.train()
        torch.manual_seed(0)
        assert not torch.allclose(net(x), net(x))
