"""mae_vit: the published key layout, masking, loss, reconstruction, every ViT variant and input size."""

import json

import pytest
import torch
from conftest import FIXTURES, TINY_VIT_CONFIG

from birder.errors import BirderError, UnknownModelError
from birder.model_registry import Task, registry
from birder.net.mim import MAE_ViT
from birder.net.mim.mae_vit import random_masking, sincos_pos_embed_2d

TINY_DECODER = {"decoder_dim": 32, "decoder_depth": 1, "decoder_num_heads": 4, "decoder_mlp_dim": 64}


def tiny_mae(network: str = "vit_b16", size=(32, 48), patch_size: int = 8, seed: int = 0, **mim_config) -> MAE_ViT:
    torch.manual_seed(seed)
    encoder = registry.net_factory(network, 0, config={**TINY_VIT_CONFIG, "patch_size": patch_size}, size=size)
    return registry.mim_net_factory("mae_vit", encoder, config={**TINY_DECODER, **mim_config})


def _fixture_shapes(layout: str) -> dict[str, list[int]]:
    return json.loads((FIXTURES / f"mae_vit_vit_l16_224px_{layout}_state_dict_shapes.json").read_text())


def test_vit_l16_keys_and_shapes_match_the_published_layout() -> None:
    with torch.device("meta"):
        encoder = registry.net_factory("vit_l16", 0, size=(224, 224))
        mae = registry.mim_net_factory("mae_vit", encoder)

    shapes = {key: list(value.shape) for key, value in mae.state_dict().items()}
    expected = _fixture_shapes("current")
    assert shapes == expected
    assert list(shapes) == list(expected)  # same order too, like the reference's state dict


def test_legacy_layout_is_renamed_to_the_current_one() -> None:
    legacy = {key: torch.empty(shape, device="meta") for key, shape in _fixture_shapes("legacy").items()}
    with torch.device("meta"):
        mae = registry.mim_net_factory("mae_vit", registry.net_factory("vit_l16", 0, size=(224, 224)))

    upgraded = mae.upgrade_state_dict(legacy)
    assert {key: list(value.shape) for key, value in upgraded.items()} == _fixture_shapes("current")


@pytest.mark.parametrize("network", ["vit_b16", "vit_reg4_b16", "vit_b16_avg", "vit_reg1_b16_avg", "vit_b16_ls_pn"])
def test_every_vit_variant_trains_through_mae(network: str) -> None:
    mae = tiny_mae(network)
    encoder = mae.encoder
    grid_patches = (32 // 8) * (48 // 8)
    assert mae.decoder_pos_embed.shape == (int(encoder.class_token_enabled) + grid_patches, 32)

    images = torch.randn(3, 3, 32, 48)
    seen_lengths = []
    hook = encoder.encoder.register_forward_pre_hook(lambda _module, args: seen_lengths.append(args[0].shape[1]))
    (loss, pred, mask) = mae(images)
    hook.remove()

    keep = int(grid_patches * 0.25)
    assert seen_lengths == [encoder.num_special_tokens + keep]  # the encoder sees the kept patches only
    assert pred.shape == (3, grid_patches, 8 * 8 * 3)
    assert mask.shape == (3, grid_patches)
    assert mask.sum(dim=1).tolist() == [grid_patches - keep] * 3
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in mae.parameters())  # every weight is used, no DDP unused-parameter trap


def test_any_input_size_works() -> None:
    mae = tiny_mae(size=(32, 32)).eval()
    (loss, pred, mask) = mae(torch.randn(2, 3, 48, 64))  # another grid than the one the encoder was built for
    assert pred.shape == (2, 6 * 8, 192) and mask.shape == (2, 48) and torch.isfinite(loss)


def test_input_not_a_multiple_of_the_patch_size_is_a_clear_error() -> None:
    with pytest.raises(BirderError, match="patch size"):
        tiny_mae()(torch.randn(1, 3, 30, 48))


def test_patchify_order_and_round_trip() -> None:
    mae = tiny_mae()
    images = torch.randn(2, 3, 32, 48)
    patches = mae.patchify(images)
    assert patches.shape == (2, 24, 192)
    # Patch (0, 1) holds rows 0..7, columns 8..15, flattened as (p, q, c).
    assert torch.equal(patches[0, 1], images[0, :, :8, 8:16].permute(1, 2, 0).reshape(-1))
    assert torch.equal(mae.unpatchify(patches, (4, 6)), images)


def test_loss_counts_hidden_patches_only() -> None:
    mae = tiny_mae()
    images = torch.randn(2, 3, 32, 48)
    target = mae.patchify(images)
    mask = torch.zeros(2, 24)
    mask[:, :18] = 1
    assert mae.loss(images, target, mask) == 0

    wrong_visible = target.clone()
    wrong_visible[:, 18:] += 5.0  # visible patches are not scored
    assert mae.loss(images, wrong_visible, mask) == 0

    wrong_hidden = target.clone()
    wrong_hidden[:, :18] += 1.0
    assert mae.loss(images, wrong_hidden, mask) == pytest.approx(1.0)


def test_reconstruction_undoes_norm_pix_targets() -> None:
    mae = tiny_mae(norm_pix_loss=True)
    images = torch.randn(2, 3, 32, 48)
    target = mae.patchify(images)
    normalized = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    mask = (torch.rand(2, 24) > 0.5).float()
    assert mae.loss(images, normalized, mask) == pytest.approx(0.0, abs=1e-6)

    recon = mae.reconstruct(images, normalized, mask)
    torch.testing.assert_close(recon.predicted, images, atol=1e-4, rtol=0)
    torch.testing.assert_close(recon.pasted, images, atol=1e-4, rtol=0)
    hidden_pixels = mae.unpatchify(mask.unsqueeze(-1).expand_as(target), (4, 6)) > 0
    assert torch.all(recon.masked[hidden_pixels] == 0)


def test_random_masking_is_per_sample_and_restorable() -> None:
    torch.manual_seed(0)
    tokens = torch.arange(2 * 8, dtype=torch.float32).reshape(2, 8, 1)
    (kept, mask, ids_restore) = random_masking(tokens, 0.75)
    assert kept.shape == (2, 2, 1)
    for sample in range(2):
        seen = kept[sample, :, 0].long() - 8 * sample
        assert torch.all(mask[sample, seen] == 0) and mask[sample].sum() == 6

    # Any [kept, hidden] sequence gathered with ids_restore is back in patch order.
    shuffled = torch.cat([kept, torch.full((2, 6, 1), -1.0)], dim=1)
    restored = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1))
    assert torch.equal(restored[mask == 0], kept.reshape(-1, 1))


def test_sincos_embedding() -> None:
    embed = sincos_pos_embed_2d(16, (2, 3), class_token=True)
    assert embed.shape == (7, 16)
    assert torch.all(embed[0] == 0)
    assert len({tuple(row.tolist()) for row in embed[1:]}) == 6  # every patch position is distinct
    assert sincos_pos_embed_2d(16, (2, 3), class_token=False).shape == (6, 16)


def test_registry_variants_and_errors() -> None:
    assert {"mae_vit", "mae_vit_npl", "mae_vit_dec4", "mae_vit_dec1_npl"} <= set(
        registry.list_models(task=Task.MASKED_IMAGE_MODELING)
    )
    encoder = registry.net_factory("vit_b16", 0, config=TINY_VIT_CONFIG, size=(32, 32))
    variant = registry.mim_net_factory("mae_vit_dec2_npl", encoder, config={"decoder_dim": 32, "decoder_num_heads": 4})
    assert len(variant.decoder) == 2 + 2 and variant.norm_pix_loss
    assert variant.network_name == "mae_vit_dec2_npl"

    with pytest.raises(UnknownModelError, match="mae_vit"):
        registry.mim_net_factory("mae_vitt", encoder)
    with pytest.raises(BirderError, match="headless"):
        registry.mim_net_factory("mae_vit", registry.net_factory("vit_b16", 5, config=TINY_VIT_CONFIG, size=(32, 32)))
    with pytest.raises(BirderError, match="unknown config"):
        registry.mim_net_factory("mae_vit", encoder, config={"decoder_width": 3})


def test_encoder_state_is_the_plain_vit_state() -> None:
    mae = tiny_mae()
    encoder_keys = {key.removeprefix("encoder.") for key in mae.state_dict() if key.startswith("encoder.")}
    classifier = registry.net_factory("vit_b16", 0, config={**TINY_VIT_CONFIG, "patch_size": 8}, size=(32, 48))
    assert encoder_keys == set(classifier.state_dict())
