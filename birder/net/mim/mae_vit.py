"""Masked autoencoder (MAE) pretraining of a ViT encoder (docs/compatibility.md, "MAE pretraining").

A random 75 % of the patches of each image is hidden; the encoder sees only the rest (plus its special tokens,
with their position embeddings) and a light decoder, fed the encoded tokens and a shared mask token at the
hidden positions, predicts the hidden pixels. Only the encoder is kept afterwards.

State-dict keys: ``mask_token``, ``decoder_pos_embed``, ``encoder.<ViT keys without classifier>``,
``decoder_embed.*``, ``decoder.{0..depth-1}.<ViT block keys>``, ``decoder.<depth>`` (LayerNorm) and
``decoder.<depth + 1>`` (the pixel head): the published Birder layout, so its MIM checkpoints load.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from birder.errors import BirderError
from birder.model_registry import registry
from birder.net.mim.base import MIMBaseNet
from birder.net.vit import EncoderBlock, ViT, rename_legacy_vit_keys


class MAEOutput(NamedTuple):
    loss: torch.Tensor  # scalar: mean squared error over the hidden patches
    pred: torch.Tensor  # [B, L, p*p*C]: predicted pixels of every patch (normalized per patch with norm_pix_loss)
    mask: torch.Tensor  # [B, L]: 1 where the patch was hidden from the encoder, 0 where it was seen


class Reconstruction(NamedTuple):
    masked: torch.Tensor  # [B, C, H, W]: the input with hidden patches set to 0 (the mean colour once normalized)
    predicted: torch.Tensor  # [B, C, H, W]: the decoder's prediction of every patch
    pasted: torch.Tensor  # [B, C, H, W]: seen patches from the input, hidden ones from the prediction


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], class_token: bool) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding ``[(1 if class_token) + h*w, dim]``, row-major over the grid.

    Half the channels encode the row, half the column; the class token gets a zero row.
    """
    if dim % 4 != 0:
        raise BirderError(f"decoder width {dim} must be a multiple of 4 for the 2-D sin-cos position embedding")

    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = torch.arange(grid[0], dtype=torch.float64).repeat_interleave(grid[1])
    cols = torch.arange(grid[1], dtype=torch.float64).repeat(grid[0])
    parts = []
    for coord in (rows, cols):
        angles = coord[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]

    embed = torch.cat(parts, dim=1).float()
    if class_token:
        embed = torch.cat([torch.zeros(1, dim), embed], dim=0)

    return embed


def random_masking(tokens: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random ``int(L * (1 - mask_ratio))`` tokens of each sample.

    Returns ``(kept [B, keep, D], mask [B, L] (1 = hidden), ids_restore [B, L])``; ``ids_restore`` puts the
    ``[kept, hidden]`` order back into patch order.
    """
    (batch, length, dim) = tokens.shape
    keep = max(1, int(length * (1 - mask_ratio)))
    noise = torch.rand(batch, length, device=tokens.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    kept = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(batch, length, device=tokens.device)
    mask[:, :keep] = 0
    return (kept, torch.gather(mask, 1, ids_restore), ids_restore)


class MAE_ViT(MIMBaseNet):
    default_config: Mapping[str, Any] = {
        "mask_ratio": 0.75,
        "decoder_dim": 512,
        "decoder_depth": 8,
        "decoder_num_heads": 16,
        "decoder_mlp_dim": 2048,
        "norm_pix_loss": False,
    }

    def __init__(self, encoder: ViT, *, config: Mapping[str, Any] | None = None) -> None:
        if not isinstance(encoder, ViT):
            raise BirderError(f"mae_vit needs a ViT encoder, got {type(encoder).__name__}")
        if encoder.num_classes != 0:
            raise BirderError("mae_vit needs a headless encoder: build it with num_classes=0")

        super().__init__(config=config)
        self.mask_ratio: float = self.config["mask_ratio"]
        self.norm_pix_loss: bool = self.config["norm_pix_loss"]
        self.patch_size = encoder.patch_size
        decoder_dim = self.config["decoder_dim"]
        depth = self.config["decoder_depth"]

        # Attribute order is the state-dict order of the published layout: own tensors, then encoder, decoder.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # Fixed, not learned: a buffer keeps it out of the optimizer while still in the checkpoint.
        self.register_buffer(
            "decoder_pos_embed", sincos_pos_embed_2d(decoder_dim, encoder.grid_size, encoder.class_token_enabled)
        )
        self.encoder = encoder
        self.decoder_embed = nn.Linear(encoder.hidden_dim, decoder_dim)
        blocks = [
            EncoderBlock(decoder_dim, self.config["decoder_num_heads"], self.config["decoder_mlp_dim"])
            for _ in range(depth)
        ]
        pixels_per_patch = self.patch_size * self.patch_size * encoder.input_channels
        self.decoder = nn.Sequential(
            *blocks, nn.LayerNorm(decoder_dim, eps=1e-6), nn.Linear(decoder_dim, pixels_per_patch)
        )
        self._init_weights()

    def _init_weights(self) -> None:
        if self.mask_token.is_meta:
            return  # built to receive a checkpoint

        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, *self.decoder.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # Pixels <-> patches, in the (h, w, p, q, c) order of the targets

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, h*w, p*p*C]``."""
        (batch, channels, height, width) = images.shape
        p = self.patch_size
        (h, w) = (height // p, width // p)
        x = images.reshape(batch, channels, h, p, w, p)
        return torch.einsum("bchpwq->bhwpqc", x).reshape(batch, h * w, p * p * channels)

    def unpatchify(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``[B, h*w, p*p*C]`` -> ``[B, C, H, W]``."""
        p = self.patch_size
        (batch, _, pixels) = patches.shape
        channels = pixels // (p * p)
        x = patches.reshape(batch, grid[0], grid[1], p, p, channels)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(batch, channels, grid[0] * p, grid[1] * p)

    # The model

    def _decoder_pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        if tuple(grid) == tuple(self.encoder.grid_size):
            return self.decoder_pos_embed

        # Another input size: the embedding is a fixed function of the grid, so compute it rather than resize.
        embed = sincos_pos_embed_2d(self.config["decoder_dim"], grid, self.encoder.class_token_enabled)
        return embed.to(self.decoder_pos_embed.device)

    def forward_encoder(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Encode a random subset of each image's patches: ``(latent [B, S + keep, D], mask, ids_restore, grid)``."""
        enc = self.encoder
        (patches, grid) = enc.patch_embed(images)
        pos = enc.pos_embedding_for(grid)
        special_count = enc.num_special_tokens
        patches = patches + pos[:, special_count:].to(patches.dtype)
        (kept, mask, ids_restore) = random_masking(patches, self.mask_ratio)
        special = enc.special_tokens(images.shape[0])
        if special:
            special_tokens = torch.cat(special, dim=1) + pos[:, :special_count]
            kept = torch.cat([special_tokens.to(kept.dtype), kept], dim=1)

        x = enc.norm(enc.encoder(kept))
        return (x, mask, ids_restore, grid)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Predict the pixels of every patch: ``[B, L, p*p*C]``."""
        enc = self.encoder
        x = self.decoder_embed(latent)
        x = x[:, enc.num_reg_tokens :]  # registers have no pixels to predict and no decoder position
        class_token = None
        if enc.class_token_enabled:
            (class_token, x) = (x[:, :1], x[:, 1:])

        (batch, kept, dim) = x.shape
        length = ids_restore.shape[1]
        mask_tokens = self.mask_token.to(x.dtype).expand(batch, length - kept, dim)
        x = torch.cat([x, mask_tokens], dim=1)
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))
        if class_token is not None:
            x = torch.cat([class_token, x], dim=1)

        x = x + self._decoder_pos_embed_for(grid).to(x.dtype)
        x = self.decoder(x)
        return x[:, 1:] if class_token is not None else x

    def loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the hidden patches only (in float32 under AMP)."""
        target = self.patchify(images).float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5

        per_patch = (pred.float() - target).pow(2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, images: torch.Tensor) -> MAEOutput:
        p = self.patch_size
        if images.shape[-2] % p != 0 or images.shape[-1] % p != 0:
            raise BirderError(f"input size {tuple(images.shape[-2:])} is not a multiple of the patch size {p}")

        (latent, mask, ids_restore, grid) = self.forward_encoder(images)
        pred = self.forward_decoder(latent, ids_restore, grid)
        return MAEOutput(self.loss(images, pred, mask), pred, mask)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> Reconstruction:
        """Turn a prediction and its mask back into images (in the input's normalized colour space)."""
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        target = self.patchify(images).float()
        pred = pred.float()
        if self.norm_pix_loss:
            # The decoder predicts each patch normalized by its own statistics: undo that with the input's.
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
            pred = pred * std + mean

        hidden = mask.float().unsqueeze(-1)
        return Reconstruction(
            masked=self.unpatchify(target * (1 - hidden), grid),
            predicted=self.unpatchify(pred, grid),
            pasted=self.unpatchify(target * (1 - hidden) + pred * hidden, grid),
        )

    def own_no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def upgrade_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Legacy (Birder <= 0.3) block names, in the encoder and the decoder alike."""
        return rename_legacy_vit_keys(state_dict)


# The published network and its lighter-decoder / normalized-pixel-target variants.
for _depth_suffix, _depth in (("", 8), ("_dec4", 4), ("_dec2", 2), ("_dec1", 1)):
    registry.register_model(f"mae_vit{_depth_suffix}", MAE_ViT, {"decoder_depth": _depth})
    registry.register_model(f"mae_vit{_depth_suffix}_npl", MAE_ViT, {"decoder_depth": _depth, "norm_pix_loss": True})
